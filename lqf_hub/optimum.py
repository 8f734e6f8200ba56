"""The solver's run: λ chosen on a validation split from one Krylov path, then the certified optimum.

1. Hold out a stratified, seeded part of the training images (never the test split).
2. One Lanczos run on the rest gives the optimum for every λ of the grid (``solve.KrylovPath``); each is
   scored on the held-out images by the objective's own loss. The one-standard-error rule picks λ: the
   largest λ whose mean validation loss is within one standard error of the best mean loss — the most
   regularised model that the held-out images cannot tell from the best (Breiman et al. 1984; Hastie,
   Tibshirani & Friedman, Elements of Statistical Learning §7.10). Larger λ is also faster to certify.
3. Refit on all training images at that λ by conjugate gradients until the certificate holds
   (``solve.solve``; from zero: warm starts from the path's solution or its Ritz vectors saved nothing measurable).

With the K-FAC prior, M is built from the data term's own curvature, so λ is on the same scale for every
backbone and dataset (λ = 1: the prior weighs as much as the data).
"""

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .solve import DataTerm, KrylovPath, PriorMetric


SELECTION_TOLERANCE = 3e-2
"""Relative gradient norm of the path's solutions at the grid's smallest λ: scoring needs their predictions,
not a certificate. On the default task (Fashion-MNIST, 800 + 200 images) every λ's held-out loss was within
0.02 of its value at 1e-3 once the residual was below 4e-2 — a hundredth of its standard error (≈ 1.4)."""


@dataclass
class PathPoint:
    """One λ of the regularisation path, scored on the held-out images."""

    ridge: float
    validation_accuracy: float
    validation_loss: float
    standard_error: float  # of the mean validation loss (per-image spread / √n)
    residual: float  # the path's estimated relative gradient norm at this λ (on the images it was fit on)


@dataclass
class Selection:
    ridge: float
    points: list[PathPoint]
    iterations: int  # products with G spent on the path

    def to_dict(self) -> dict:
        return {"ridge": self.ridge, "iterations": self.iterations, "path": [asdict(p) for p in self.points]}


def stratified_split(labels: Tensor, keys: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(fit, held_out)`` with ``fraction`` of every class held out (at least one, never all).

    ``keys [N, k]`` (uint8) identify the items (the cache's content digests): an item is held out by the
    hash of the seed and its key, so the split is a function of the set of images, not of their order.
    """
    fit, held = [], []
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().flatten().tolist()
        members.sort(key=lambda i: hashlib.sha256(seed.to_bytes(8, "little", signed=True) + keys[i].numpy().tobytes()).digest())
        members = torch.tensor(members)
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def select_ridge(
    make_data: Callable[[Tensor], DataTerm], labels: Tensor, keys: Tensor, metric: PriorMetric,
    ridges: list[float], *, fraction: float, seed: int, max_iterations: int, progress: bool,
) -> Selection:
    """Choose λ on held-out training images: ``make_data(indices) -> DataTerm`` over those images; ``keys``
    identify the images (see :func:`stratified_split`)."""
    fit, held = stratified_split(labels, keys, fraction, seed)
    fit_data, held_data = make_data(fit), make_data(held)
    path = KrylovPath(fit_data, metric, ridges, tolerance=SELECTION_TOLERANCE, max_iterations=max_iterations,
                      progress=progress)
    ridges = sorted(ridges, reverse=True)
    losses, accuracies = {}, {}
    for ridge in ridges:
        losses[ridge], correct = held_data.sample_scores(path.solution(ridge))
        accuracies[ridge] = float(held_data.reduce_sum(correct.double().sum()[None])) / held_data.count
    mean = {r: float(held_data.reduce_sum(losses[r].sum()[None])) / held_data.count for r in ridges}
    best = min(ridges, key=lambda r: mean[r])
    points = [PathPoint(r, accuracies[r], mean[r], _standard_error(losses[r], held_data), path.residual(r))
              for r in ridges]
    margin = next(p.standard_error for p in points if p.ridge == best)
    chosen = max(p.ridge for p in points if p.validation_loss <= mean[best] + margin)
    return Selection(chosen, points, path.iterations)


def _standard_error(values: Tensor, data: DataTerm) -> float:
    """Standard error of the mean of per-image ``values`` (this shard's ``[n]``; all processes)."""
    n = data.count
    sums = data.reduce_sum(torch.stack([values.sum(), values.square().sum()]))
    variance = max(float(sums[1]) - float(sums[0]) ** 2 / n, 0.0) / max(n - 1, 1)
    return math.sqrt(variance / n)


def plot_path(points: list[PathPoint], chosen: float, path: Path) -> None:
    """Validation accuracy and loss against λ as a PNG (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes

    ridges = [p.ridge for p in points]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_acc.plot(ridges, [100 * p.validation_accuracy for p in points], "o-")
    ax_loss.errorbar(ridges, [p.validation_loss for p in points], yerr=[p.standard_error for p in points], fmt="o-",
                     color="C1", capsize=3)
    for axis in (ax_acc, ax_loss):
        axis.axvline(chosen, color="grey", linestyle="--", label=f"chosen λ = {chosen:.3g}")
        axis.set_xscale("log")
        axis.set_xlabel("λ")
    ax_acc.set(ylabel="validation accuracy (%)", title="accuracy on held-out training images")
    ax_loss.set(ylabel="validation loss (MSE to α·one-hot)", title="loss ± standard error (the rule)")
    ax_acc.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
