"""Training with Accelerate: ``LQFTrainer`` and its arguments, the trunk cache, the objective built from it, the
SGD loop and the trainer's resumable state."""

from .arguments import LQFTrainingArguments
from .cache import TrunkCache
from .objective import Objective, evaluate_dataset, trunk_outputs
from .trainer import LQFTrainer

__all__ = ["LQFTrainer", "LQFTrainingArguments", "Objective", "TrunkCache", "evaluate_dataset", "trunk_outputs"]
