"""Exact attribution of predictions to training images — what only a model at its optimum offers.

At the optimum of ``L(δ) = mean_i ½‖f0(x_i) + J_i δ − α y_i‖² + (λ/2) δᵀMδ`` the gradient is zero, so
``λ M δ* = (1/N) Σ_i J_iᵀ r_i`` with the residuals ``r_i = α y_i − f_lin(x_i)``, and every prediction splits
exactly over the training images (a representer theorem):

    f_lin(x) = f0(x) + Σ_i c_i(x),      c_i(x) = (1/(Nλ)) · J(x) M⁻¹ J_iᵀ · r_i        [C]

— a C×C kernel block between x and x_i times x_i's residual. At a certified δ rather than δ* the split
misses ``J(x) M⁻¹ ∇L(δ) / λ`` (:attr:`Explanation.gap`), which vanishes with the certificate's gradient.

For one image, C backward passes give ``M⁻¹ J(x)ᵀ e_c`` and C forward-mode passes over the training set
give every ``J_i M⁻¹ J(x)ᵀ e_c``: exact, at the cost of C passes over the training data per image.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .linearize import linearized
from .model import LQFModel
from .solve import DataTerm, PriorMetric


@dataclass
class Explanation:
    """One image's prediction split over the training images."""

    base: Tensor  # f0(x) [C]: the pretrained network with its head at w0
    output: Tensor  # f_lin(x) [C]: the model's prediction
    contributions: Tensor  # c_i(x) [N, C]: training image i's share of the change from f0(x)

    @property
    def predicted(self) -> int:
        return int(self.output.argmax())

    @property
    def gap(self) -> Tensor:
        """``f_lin(x) − f0(x) − Σ_i c_i(x)`` ``[C]``: zero at the exact optimum."""
        return self.output - self.base - self.contributions.sum(0)

    def ranked(self, k: int, *, supporting: bool = True) -> tuple[Tensor, Tensor]:
        """The ``k`` training images that most raise (``supporting``) or most lower the predicted class's output:
        ``(indices [k], contributions [k])``."""
        scores = self.contributions[:, self.predicted]
        values, indices = scores.topk(min(k, len(scores)), largest=supporting)
        return indices, values


class Explainer:
    """Splits an LQF model's predictions over the training images it was solved on.

    ``data`` and ``metric`` are the objective's data term (over those images, in one process) and its prior
    (``LQFTrainer.objective()`` rebuilds both); ``ridge`` is the model's λ.
    """

    def __init__(self, model: LQFModel, data: DataTerm, metric: PriorMetric, ridge: float) -> None:
        if not ridge > 0:
            raise ValueError(f"Attribution needs the model's λ > 0, got {ridge}.")
        self.model, self.data, self.metric, self.ridge = model, data, metric, ridge
        delta = data.flat.flatten(dict(model.linearized_parameters))
        targets = model.config.target_scale * torch.nn.functional.one_hot(data.labels, model.num_classes)
        self.residuals = targets.to(data.f0.dtype) - data.outputs(delta)  # r_i [N, C]

    def explain(self, trunk_output: Tensor) -> Explanation:
        """The split of one image's prediction: ``trunk_output [1, ...]`` (``model.encode_trunk`` of the image)."""
        model, data = self.model, self.data
        zero = {n: t.requires_grad_() for n, t in data.flat.unflatten(data.flat.zeros()).items()}
        base = linearized(model.tail_function(trunk_output), model.linearization_point, zero)[0]
        kernel = []  # J_i M⁻¹ J(x)ᵀ e_c, one [N, C] block per class c
        for c in range(model.num_classes):
            grads = torch.autograd.grad(base[c], list(zero.values()), retain_graph=c + 1 < model.num_classes,
                                        allow_unused=True)
            row = torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1) for g, t in zip(grads, zero.values())])
            kernel.append(data.outputs(self.metric.power(row, 1.0)) - data.f0)
        scale = 1.0 / (data.count * self.ridge)
        contributions = scale * torch.einsum("nkc,nk->nc", torch.stack(kernel, dim=-1), self.residuals)
        with torch.no_grad():
            output = model(trunk_output=trunk_output)[0]
        return Explanation(base.detach(), output.detach(), contributions.detach())
