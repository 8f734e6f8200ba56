"""lqf-hub: Linear Quadratic Fine-Tuning for timm and Hugging Face vision models."""

from ._version import __version__
from .config import LQFConfig
from .data import class_names, image_transform, load_image_dataset, sample_shots, split_validation, with_transform
from .errors import CheckpointError, CurvatureError, DataUnreachable, LQFError, TrainingDiverged
from .modeling.model import LQFModel
from .training.arguments import LQFTrainingArguments
from .training.trainer import LQFTrainer

__all__ = [
    "CheckpointError", "CurvatureError", "DataUnreachable", "LQFConfig", "LQFError", "LQFModel", "LQFTrainer", "LQFTrainingArguments",
    "TrainingDiverged", "__version__", "class_names", "image_transform", "load_image_dataset", "sample_shots",
    "split_validation", "with_transform",
]
