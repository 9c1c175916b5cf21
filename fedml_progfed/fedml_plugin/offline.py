"""Start FedML without contacting its hosted platform.

``fedml.init`` (0.9.6) always calls ``fedml.core.mlops.fetch_config``, which
tries five times to download MQTT/S3 settings from the hosted MLOps service,
even with ``using_mlops: false`` and ``check_env=False`` (FEDML_NOTES). Runs of
this package never use that service, so the fetch is replaced by its offline
outcome: the same local attributes, no request.
"""

from __future__ import annotations

import platform
from typing import Any


def _fetch_config_offline(args: Any, version: str = "release") -> bool:
    args.os_name = "MacOS" if platform.system() == "Darwin" else platform.system()
    args.version = version
    args.config_version = version
    args.cloud_region = ""
    return False  # what fetch_config returns when the service cannot be reached


def init_fedml_offline(args: Any) -> Any:
    """``fedml.init(args, check_env=False)`` with the hosted-config fetch disabled; returns FedML's args."""
    import fedml
    import fedml.core.mlops as mlops

    args.using_mlops = False
    args.enable_tracking = False
    args.enable_wandb = False
    mlops.fetch_config = _fetch_config_offline
    return fedml.init(args, check_env=False, should_init_logs=False)
