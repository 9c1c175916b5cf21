"""Staged architectures of ProgFed (Sec. 4.1, App. B) behind a name -> builder registry.

Importing this package registers every architecture module.
"""

from fedml_progfed.models import convnet, resnet, unet3d, vgg  # noqa: F401  (register the builders)
from fedml_progfed.models.registry import available_models, build_model, default_stages, register_model

__all__ = ["available_models", "build_model", "default_stages", "register_model"]
