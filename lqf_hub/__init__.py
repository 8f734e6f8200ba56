"""lqf-hub: Linear Quadratic Fine-Tuning for timm and Hugging Face vision models."""

from importlib.metadata import PackageNotFoundError, version

from .config import LQFConfig
from .data import class_names, image_transform, load_image_dataset, sample_shots, split_validation, with_transform
from .errors import CheckpointError, CurvatureError, DataUnreachable, LQFError, TrainingDiverged
from .model import LQFModel
from .train import LQFTrainer
from .training_args import LQFTrainingArguments

try:
    __version__ = version("lqf-hub")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CheckpointError", "CurvatureError", "DataUnreachable", "LQFConfig", "LQFError", "LQFModel", "LQFTrainer", "LQFTrainingArguments",
    "TrainingDiverged", "__version__", "class_names", "image_transform", "load_image_dataset", "sample_shots",
    "split_validation", "with_transform",
]
