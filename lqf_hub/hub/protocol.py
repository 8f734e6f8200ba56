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
    def posterior_state(self) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The posterior's tensors and scalars (strings), or None when the model has none."""
    def load_posterior_state(self, tensors: Mapping[str, Tensor], scalars: Mapping[str, str]) -> None:
        """Set the posterior from ``posterior_state``'s output; ValueError when it does not fit the model."""
