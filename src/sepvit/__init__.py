"""sepvit: efficient vision transformers (SepViT, MobileViTv2, EfficientViT) for timm."""

from sepvit import models as models  # registers every model in timm's registry
from sepvit.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models"]
