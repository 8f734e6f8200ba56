"""The LQF objective: squared error to scaled one-hot targets plus a ridge towards the linearization point.

``L(δ) = mean_i ½‖f_lin(x_i) − α·onehot(y_i)‖² + (λ/2)‖δ‖²`` — a convex quadratic in δ with Hessian
``E[JᵀJ] + λI``. Cross-entropy stays available for ablations (it makes the problem non-quadratic).
"""

import enum
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


class Loss(str, enum.Enum):
    MSE = "mse"
    CROSS_ENTROPY = "cross_entropy"


def data_loss(logits: Tensor, labels: Tensor, target_scale: float, kind: Loss = Loss.MSE) -> Tensor:
    """Mean over the batch: ``logits [B, K]``, ``labels [B]`` (int) -> scalar."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: loss in float32
    if kind is Loss.CROSS_ENTROPY:
        return F.cross_entropy(logits, labels)
    targets = target_scale * F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return 0.5 * (logits - targets).square().sum(-1).mean()


def ridge_penalty(deltas: Iterable[Tensor], ridge: float) -> Tensor:
    """(λ/2)‖δ‖² summed over all linearized tensors."""
    return 0.5 * ridge * sum(d.float().square().sum() for d in deltas)
