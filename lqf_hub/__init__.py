"""lqf-hub: Linear Quadratic Fine-Tuning for timm and Hugging Face vision models."""

from .config import LQFConfig
from .model import LQFModel
from .train import LQFTrainer, TrainingArguments, TrainingDiverged

__version__ = "0.1.0"
__all__ = ["LQFConfig", "LQFModel", "LQFTrainer", "TrainingArguments", "TrainingDiverged", "__version__"]
