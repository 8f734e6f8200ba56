"""The evidence: the marginal likelihood of LQF's linear-Gaussian model, a score of the prior and λ that needs no
held-out image (MacKay 1992; the linearized-Laplace evidence of Immer et al., AISTATS 2021, exact here).

With the α-scaled targets ``t_i ~ N(f0(x_i) + J_i δ, σ² I_K)`` and the prior ``δ ~ N(0, σ²/(Nλ) · M⁻¹)``:

    log Z(λ, σ²) = −N·L_λ/σ² − ½ Σ_j log(1 + μ_j/λ) − (N·K/2)·log(2πσ²)

with ``L_λ`` the objective at its optimum (``mean ½‖r_i‖² + λ/2·δᵀMδ``) and ``μ_j`` the eigenvalues of ``M⁻¹G``.
The σ² that maximises it is ``2L_λ/K``, which leaves ``log Z(λ) = −(N·K/2)(1 + log(4π·L_λ/K)) − ½ Σ_j log(1 +
μ_j/λ)``: a better fit against a larger effective number of parameters.

``L_λ`` for every λ comes from the Lanczos path on all the images (``KrylovPath.decrease``), the log-determinant for
every λ by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): Hutchinson probes z (Rademacher, in the prior's
whitened coordinates), each ``zᵀ log(I + A/λ) z`` by Gauss quadrature from a Lanczos path on ``A = M^-½ G M^-½``
started at z. With p probes the estimate's standard deviation is √(2/p)·‖log(I + A/λ)‖_F, at most √(2/p) times the
log-determinant itself and much less when many eigenvalues count (small λ); against the fit term, N·K/2 times a
logarithm, a few probes suffice, and their spread is reported. LQF-head's evidence is exact (μ: the head features'
Gram eigenvalues, each K times).
"""

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..plotting import save_png, subplots
from .solve import DataTerm, HeadPath, KrylovPath, PriorMetric

EVIDENCE_TOLERANCE = 3e-2
"""Relative residual at the grid's smallest λ where the evidence's Lanczos paths (its fit and its log-determinant
probes) stop, for every prior: the setting its comparison with cross-validation ran at
(``benchmarks/results/evidence.md``). Cross-validation's paths stop per prior (``selection.PATH_TOLERANCE``)."""


@dataclass
class EvidencePath:
    """The evidence of one prior along λ (``ridges``, largest first)."""

    prior: str
    ridges: list[float]
    log_evidence: list[float]  # log Z / N: per training image
    fit: list[float]  # L_λ, the objective at its optimum
    log_determinant: list[float]  # Σ_j log(1 + μ_j/λ), estimated (exact for the head prior)
    log_determinant_error: list[float]  # its standard error over the probes (0: exact; nan: one probe)
    noise_variance: list[float]  # σ² = 2·L_λ/K, the noise that maximises the evidence
    products: int  # products with G spent (the path and the probes)
    images: int  # N, the training images it was computed over
    fit_path: KrylovPath | HeadPath | None = field(default=None, repr=False)  # its optimum at every λ (not saved)

    @property
    def best(self) -> float:
        """The λ of the largest evidence."""
        return self.ridges[int(np.argmax(self.log_evidence))]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fit_path"}


def most_evident(paths: dict[str, EvidencePath]) -> tuple[str, float]:
    """The (prior, λ) of the largest evidence over every prior's path."""
    return max(((kind, ridge) for kind, path in paths.items() for ridge in path.ridges),
               key=lambda choice: paths[choice[0]].log_evidence[paths[choice[0]].ridges.index(choice[1])])


def plot_evidence(paths: dict[str, EvidencePath], prior: str, ridge: float, path: Path) -> None:
    """The log evidence per training image against λ, one line per prior, as a PNG (written atomically)."""
    fig, axis = subplots(figsize=(5.5, 3.5))
    for kind, evidence in paths.items():
        axis.errorbar(evidence.ridges, evidence.log_evidence, fmt="o-", capsize=3,
                      yerr=[0.5 * e / evidence.images if math.isfinite(e) else 0.0  # of ½ Σ log(1 + μ/λ) / N
                            for e in evidence.log_determinant_error],
                      label=f"{kind} prior" + (" (chosen)" if kind == prior else ""))
    axis.axvline(ridge, color="grey", linestyle="--", label=f"chosen λ = {ridge:g}")
    axis.set(xscale="log", xlabel="λ", ylabel="log evidence / N", title="the evidence of each prior (no image held out)")
    axis.legend(fontsize="small")
    save_png(fig, path)


def log_evidence(fit: float, log_determinant: float, count: int, classes: int) -> float:
    """``log Z / N`` at the maximising σ², from ``L_λ``, ``Σ log(1 + μ/λ)``, N images and K outputs."""
    return -0.5 * classes * (1.0 + math.log(4.0 * math.pi * fit / classes)) - 0.5 * log_determinant / count


def evidence_path(
    data: DataTerm, metric: PriorMetric, ridges: list[float], *, probes: int = 2, seed: int = 0,
    tolerance: float, max_iterations: int, progress: bool = False,
) -> EvidencePath:
    """The evidence of ``metric``'s prior at every λ of ``ridges`` over all of ``data``'s images: one Lanczos path
    for the fit and ``probes`` Lanczos paths from Rademacher vectors (drawn from ``seed``) for the log-determinant,
    each run until its estimated relative residual at the smallest λ is below ``tolerance``."""
    if probes < 1:
        raise ValueError(f"`probes` must be >= 1, got {probes}.")
    ridges = sorted(ridges, reverse=True)
    classes, products = data.model.num_classes, 0
    if metric.kind == "head":  # closed form: M is the identity on the head, G's head block gram ⊗ I_K
        path = HeadPath(data)
        eigenvalues = path.eigenvalues.clamp_min(0).double()
        log_determinants = np.array([[classes * float(torch.log1p(eigenvalues / r).sum()) for r in ridges]])
    else:
        path = KrylovPath(data, metric, ridges, tolerance=tolerance, max_iterations=max_iterations,
                          progress=progress, description=f"evidence, {metric.kind} prior: the fit")
        products += path.iterations
        generator = torch.Generator().manual_seed(seed)
        estimates = []
        for probe in range(probes):
            z = (torch.randint(0, 2, (sum(data.flat.sizes),), generator=generator) * 2 - 1).to(data.flat.device,
                                                                                            data.flat.dtype)
            lanczos = KrylovPath(data, metric, ridges, tolerance=tolerance, max_iterations=max_iterations,
                                 progress=progress, start=z,
                                 description=f"evidence, {metric.kind} prior: log-determinant probe {probe + 1}")
            products += lanczos.iterations
            estimates.append([lanczos.quadrature(lambda theta, r=r: np.log1p(theta / r)) for r in ridges])
        log_determinants = np.array(estimates)
    fits = [data.constant - path.decrease(r) for r in ridges]
    mean = log_determinants.mean(0)
    if len(log_determinants) > 1:
        errors = (log_determinants.std(0, ddof=1) / math.sqrt(len(log_determinants))).tolist()
    else:
        errors = [0.0 if metric.kind == "head" else math.nan] * len(ridges)
    return EvidencePath(metric.kind, ridges, [log_evidence(f, d, data.count, classes) for f, d in zip(fits, mean)],
                        fits, mean.tolist(), errors, [2.0 * f / classes for f in fits], products, data.count, path)
