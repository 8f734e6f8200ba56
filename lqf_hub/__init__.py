"""lqf-hub: Linear Quadratic Fine-Tuning for timm and Hugging Face vision models."""

from importlib.metadata import PackageNotFoundError, version

from .config import LQFConfig
from .errors import CheckpointError, CurvatureError, LQFError, TrainingDiverged
from .model import LQFModel
from .train import LQFTrainer, TrainingArguments

try:
    __version__ = version("lqf-hub")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CheckpointError", "CurvatureError", "LQFConfig", "LQFError", "LQFModel", "LQFTrainer", "TrainingArguments",
    "TrainingDiverged", "__version__",
]
