"""Staged architectures of ProgFed (Sec. 4.1, App. B) behind a name -> architecture registry.

Importing this package registers every architecture module. Each entry carries its
capabilities: ``models_with(PROFL)`` names the models ProFL can train.
"""

from fedml_progfed.models import convnet, resnet, unet3d, vgg  # noqa: F401  (register the builders)
from fedml_progfed.models.registry import (
    CAPABILITIES,
    MODELS,
    PROFL,
    ModelEntry,
    available_models,
    build_model,
    default_stages,
    model_entry,
    models_with,
    register_model,
)

__all__ = [
    "CAPABILITIES",
    "MODELS",
    "PROFL",
    "ModelEntry",
    "available_models",
    "build_model",
    "default_stages",
    "model_entry",
    "models_with",
    "register_model",
]
