"""Thin FedML adapters: ``ProgFedClientTrainer`` and ``ProgFedServerAggregator``.

FedML 0.9.6 warns at import time about pkg_resources and requests' pins; those
warnings are about FedML's own dependencies, not the user's run, so they are
silenced here once.
"""

import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
warnings.filterwarnings("ignore", message=r"urllib3 .* doesn't match a supported version")

from fedml_progfed.fedml_plugin.aggregator import ProgFedServerAggregator  # noqa: E402
from fedml_progfed.fedml_plugin.trainer import ProgFedClientTrainer  # noqa: E402

__all__ = ["ProgFedClientTrainer", "ProgFedServerAggregator"]
