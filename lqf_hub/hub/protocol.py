"""What the checkpoint format needs of a model: ``Checkpointable`` (``LQFModel`` is one), so that the format
does not import the model that uses it."""

from collections.abc import Mapping
from typing import Any, Protocol

from torch import Tensor

from ..config import LQFConfig


class Checkpointable(Protocol):
    """A linearized model as the checkpoint format sees it: its config, training summary and tensors by part."""

    config: LQFConfig
    training_summary: dict[str, Any]

    def checkpoint_state(self) -> dict[str, dict[str, Tensor]]:
        """``{"base": ..., "head": ..., "delta": ...}``: the tensors saved, by part."""
    def load_checkpoint_state(self, parts: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Fill the model's tensors from ``checkpoint_state``'s parts."""
