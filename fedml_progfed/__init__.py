"""fedml-progfed: progressive federated training (ProgFed, ICML 2022) as a FedML plugin.

The FedML pair lives in :mod:`fedml_progfed.fedml_plugin`; the framework-free
algorithm in :mod:`fedml_progfed.core`.
"""

__version__ = "0.1.0"

import warnings as _warnings

# FedML 0.9.6 warns at import about pkg_resources and requests' pins: its own
# dependencies, nothing a user of this package can act on.
_warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
_warnings.filterwarnings("ignore", message=r"urllib3 .* doesn't match a supported version")
