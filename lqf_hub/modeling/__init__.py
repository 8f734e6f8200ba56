"""The linearized model: ``LQFModel`` (f(x; w0) + J·δ around the pretrained weights), the forward-mode pass that
computes it, the activations' treatment and the loss."""

from .linearize import linearized
from .loss import Loss, data_loss
from .model import LQFModel

__all__ = ["LQFModel", "Loss", "data_loss", "linearized"]
