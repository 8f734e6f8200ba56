"""Probabilities from LQF's outputs, and how far to trust them.

LQF's outputs regress towards ``α·onehot(y)``: their softmax is not a calibrated probability (on the default job,
mean top probability 93.7% for 85.3% accuracy). One temperature ``T`` — ``softmax(f/T)`` — is fitted by
minimising the negative log-likelihood of the cross-validation's out-of-fold outputs at the chosen prior and λ
(temperature scaling, Guo et al. 2017): predictions of models that did not see those images, which the solver has
already computed, so calibration costs no extra pass and reads no validation or test image.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor

from ..plotting import save_png, subplots

CALIBRATION_BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al. 2017; Naeini et al. 2015)."""

TEMPERATURE_RANGE = (1e-2, 1e3)
"""Where the fitted temperature is searched (outputs are on the scale of α = 15: T of a few units is usual)."""


def fit_temperature(outputs: Tensor, labels: Tensor) -> float:
    """The ``T`` minimising the mean NLL of ``softmax(outputs / T)``: ``outputs [n, C]``, ``labels [n]``.

    The NLL is convex in 1/T, so the bounded 1-D search over log T finds its minimum."""
    outputs, labels = outputs.double(), labels.long()

    def nll(log_temperature: float) -> float:
        return float(F.cross_entropy(outputs / math.exp(log_temperature), labels))

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    return math.exp(minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-6}).x)


def probability_metrics(probabilities: Tensor, labels: Tensor) -> dict[str, float]:
    """NLL, expected calibration error (15 equal-width bins, top class) and Brier score (Σ_c (p_c − y_c)², mean
    over images) of ``probabilities [n, C]`` against ``labels [n]``."""
    from torchmetrics.functional.classification import multiclass_calibration_error  # seconds to import: when used

    probabilities, labels = probabilities.detach().double(), labels.long()
    onehot = F.one_hot(labels, probabilities.shape[1]).double()
    return {"nll": float(-probabilities.gather(1, labels[:, None]).clamp_min(1e-300).log().mean()),
            "ece": float(multiclass_calibration_error(probabilities, labels, probabilities.shape[1],
                                                      n_bins=CALIBRATION_BINS, norm="l1")),
            "brier": float((probabilities - onehot).square().sum(1).mean())}


def plot_reliability(probabilities: Tensor, labels: Tensor, path: Path, title: str = "") -> None:
    """The reliability diagram (accuracy against confidence per bin, with each bin's share of the images) as a PNG."""
    confidence, predicted = probabilities.detach().double().max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, CALIBRATION_BINS + 1, dtype=torch.float64)
    bins = torch.bucketize(confidence, edges[1:-1], right=True)
    count = torch.bincount(bins, minlength=CALIBRATION_BINS).double()
    accuracy = torch.bincount(bins, weights=correct, minlength=CALIBRATION_BINS) / count.clamp_min(1)
    mean_confidence = torch.bincount(bins, weights=confidence, minlength=CALIBRATION_BINS) / count.clamp_min(1)
    centres, width = (edges[1:] + edges[:-1]) / 2, 1 / CALIBRATION_BINS
    centres, count, accuracy, mean_confidence = (t.numpy() for t in (centres, count, accuracy, mean_confidence))
    fig, (top, bottom) = subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    top.bar(centres[filled], accuracy[filled], width=width, edgecolor="black", label="accuracy")
    top.bar(centres[filled], (mean_confidence - accuracy)[filled], bottom=accuracy[filled], width=width, color="red",
            alpha=0.3, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", label="calibrated")
    metrics = probability_metrics(probabilities, labels)
    top.set(ylabel="accuracy", title=title or f"ECE {100 * metrics['ece']:.1f}%, NLL {metrics['nll']:.3f}")
    top.legend(fontsize="small", loc="upper left")
    bottom.bar(centres, count / count.sum(), width=width, edgecolor="black")
    bottom.set(xlabel="confidence (top probability)", ylabel="share of images", xlim=(0, 1))
    save_png(fig, path)
