"""lqf-hub: Linear Quadratic Fine-Tuning for timm and Hugging Face vision models."""

from .config import LQFConfig
from .model import LQFModel

__version__ = "0.1.0"
__all__ = ["LQFConfig", "LQFModel", "__version__"]
