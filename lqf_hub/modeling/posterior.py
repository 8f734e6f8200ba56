"""The Bayesian reading of LQF: how sure the linearized model is of each output.

LQF is Bayesian linear regression in δ. With Gaussian noise σ² on each α-scaled target and the prior
``δ ~ N(0, σ²/(Nλ) M⁻¹)``, the posterior is Gaussian with mean δ* (what the solver returns) and covariance
``σ²/N · (G + λM)⁻¹`` — the linearized Laplace posterior (Immer et al., AISTATS 2021), exact here rather than
an approximation around a MAP point. For an image x the output is then Gaussian with mean ``f_lin(x)`` and
covariance ``σ²/N · J(x) (G + λM)⁻¹ J(x)ᵀ`` ``[K, K]`` (the GLM predictive).

``(G + λM)⁻¹`` is applied through K-FAC's eigendecompositions at w0 (``G ≈ ⊕_blocks A ⊗ B``, eigenvalues e):

* K-FAC prior, ``M = K + γ``:  ``G + λM ≈ (1 + λ)·K + λγ``, eigenvalues ``(1 + λ)e + λγ``;
* isotropic prior:             ``G + λI ≈ K + λ``,            eigenvalues ``e + λ``;
* head prior (δ of the backbone held at zero): the head's block of G is exactly ``E[φ̃φ̃ᵀ] ⊗ I`` (K-FAC's input
  factor of the head, which does not depend on how the outputs were sampled), so ``(E[φ̃φ̃ᵀ] + λ)⁻¹ ⊗ I`` is exact.

σ² is the mean squared out-of-fold residual per output (the noise's maximum-likelihood estimate from predictions
of models that did not see those images); N the number of training images.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kfac_state import FACTORS, BlockState, parse_kfac_state

HEAD_WEIGHT = "head.weight"
PRIORS = ("kfac", "isotropic", "head")


def noise_variance(outputs: Tensor, labels: Tensor, target_scale: float) -> float:
    """σ²: the mean squared residual per output of ``outputs [n, K]`` against ``α·onehot(labels [n])``."""
    targets = target_scale * torch.nn.functional.one_hot(labels.long(), outputs.shape[1]).double()
    return float((outputs.double() - targets).square().mean())


@dataclass
class Posterior:
    """The posterior over δ in K-FAC form. ``curvature``: a finalized ``KFAC.state_dict()`` at w0 (built with
    ridge 0 and ``damping``); ``names``: the linearized tensors (network names, in order: a bias is stored by its
    index); ``prior`` and ``ridge`` λ: what the solver chose; ``count``: N training images; ``noise_variance``: σ²."""

    curvature: dict[str, Tensor]
    names: list[str]
    damping: float
    prior: str
    ridge: float
    count: int
    noise_variance: float
    _blocks: dict[str, BlockState] = field(init=False, repr=False)
    _diagonals: dict[str, Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ValueError(f"`prior` must be one of {PRIORS}, got {self.prior!r}.")
        for name, value in (("ridge", self.ridge), ("noise_variance", self.noise_variance), ("count", self.count)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"The posterior's `{name}` must be a finite number > 0, got {value!r}.")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"The posterior's `damping` must be a finite number >= 0, got {self.damping!r}.")
        self._blocks, self._diagonals = self._parts()  # parsed once: every covariance reads them

    def covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        """``σ²/N · J (G + λM)⁻¹ Jᵀ`` per image, from ``jacobians`` (network name -> ``[B, K, *shape]``, the
        outputs' derivatives by each linearized tensor at w0): ``[B, K, K]``, in the Jacobians' dtype."""
        whitened = self._whiten(jacobians)  # [B, K, p]: (G + λM)^-½ Jᵀ in K-FAC's eigenbases
        return (self.noise_variance / self.count) * whitened @ whitened.transpose(-1, -2)

    def needs(self) -> list[str]:
        """The linearized tensors whose Jacobians ``covariance`` reads (the head's alone under the head prior)."""
        if self.prior == "head":
            return [n for n in self.names if n.startswith("head.")]
        return list(self.names)

    def _whiten(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        parts, dtype = [], next(iter(jacobians.values())).dtype  # float32 sums of squares: no cancellation to fear
        for name, block in self._blocks.items():
            weight = jacobians[name]
            batch, groups = weight.shape[:2], block.groups
            matrix = weight.reshape(*batch, groups, weight.shape[2] // groups, -1).to(dtype)
            if block.bias is not None:
                bias = jacobians[block.bias].reshape(*batch, groups, -1, 1).to(dtype)
                matrix = torch.cat([matrix, bias], dim=-1)
            eig_a, basis_a, eig_b, basis_b = (block.factors[k].to(matrix.device, dtype) for k in FACTORS)
            rotated = matrix @ basis_a
            if self.prior == "head":  # the head's block of G is exactly E[φ̃φ̃ᵀ] ⊗ I
                eigenvalues, mean = eig_a.unsqueeze(-2), eig_a.mean()
            else:
                rotated = basis_b.transpose(-1, -2) @ rotated
                eigenvalues, mean = eig_b.unsqueeze(-1) * eig_a.unsqueeze(-2), eig_a.mean() * eig_b.mean()
            parts.append((rotated / self._damped(eigenvalues, mean).sqrt()).flatten(2))
        if self.prior != "head":
            for name, diag in self._diagonals.items():
                values, diag = jacobians[name].flatten(2).to(dtype), diag.to(jacobians[name].device, dtype).flatten()
                parts.append(values / self._damped(diag, diag.mean()).sqrt())
        return torch.cat(parts, dim=-1)

    def _damped(self, eigenvalues: Tensor, mean: Tensor) -> Tensor:
        """The eigenvalues of K-FAC's ``G + λM`` from those of its ``G`` (a block's, or a diagonal tensor's, whose
        mean eigenvalue sets the K-FAC prior's damping γ as ``KFAC.precondition`` applies it)."""
        if self.prior == "kfac":
            return (1 + self.ridge) * eigenvalues + self.ridge * self.damping * mean
        return eigenvalues + self.ridge

    def _parts(self) -> tuple[dict[str, BlockState], dict[str, Tensor]]:
        """The curvature's Kronecker blocks (by weight name) and diagonals, in network order; the head's block alone
        under the head prior."""
        try:
            blocks, diagonals = parse_kfac_state(self.curvature, self.names)
        except ValueError as err:
            raise ValueError(f"The posterior's curvature: {err}") from None
        if self.prior == "head":
            if HEAD_WEIGHT not in blocks:
                raise ValueError("The head prior's posterior needs the head's K-FAC block; it is missing.")
            return {HEAD_WEIGHT: blocks[HEAD_WEIGHT]}, {}
        return self._in_network_order(blocks), self._in_network_order(diagonals)

    def _in_network_order(self, parts: dict) -> dict:
        """``parts`` in the order of ``names``: the sums over them, and so their bits, do not depend on the order the
        curvature was stored in (a safetensors file sorts its keys)."""
        order = {name: i for i, name in enumerate(self.names)}
        return dict(sorted(parts.items(), key=lambda item: order.get(item[0], len(order))))

    # ------------------------------------------------------------------------------------------ state
    def check(self, deltas: Mapping[str, Tensor]) -> "Posterior":
        """Check the curvature against the model's linearized tensors (network name -> δ); raises ValueError
        saying what does not fit."""
        if self.names != list(deltas):
            raise ValueError(f"The posterior was built for other linearized tensors: {self.names[:3]} … against "
                             f"{list(deltas)[:3]} ….")
        blocks, diagonals = self._blocks, self._diagonals
        covered = set(blocks) | {b.bias for b in blocks.values() if b.bias} | set(diagonals)
        unknown = sorted(covered - set(deltas))
        if unknown:
            raise ValueError(f"The posterior names tensors this model does not linearize: {unknown[:3]}.")
        if self.prior != "head" and covered != set(deltas):
            raise ValueError(f"The posterior lacks the curvature of {sorted(set(deltas) - covered)[:3]}.")
        for name, block in blocks.items():
            groups, shape = block.groups, deltas[name].shape
            d_out, d_in = shape[0] // groups, shape[1:].numel() + (block.bias is not None)
            expected = {"eig_a": (groups, d_in), "basis_a": (groups, d_in, d_in), "eig_b": (groups, d_out),
                        "basis_b": (groups, d_out, d_out)}
            for part, size in expected.items():
                if tuple(block.factors[part].shape) != size:
                    raise ValueError(f"The posterior's {part} of {name} has shape {list(block.factors[part].shape)}, expected "
                                     f"{list(size)} for a δ of shape {list(shape)}.")
        for name, diag in diagonals.items():
            if diag.shape != deltas[name].shape:
                raise ValueError(f"The posterior's diagonal of {name} has shape {list(diag.shape)}, expected "
                                 f"{list(deltas[name].shape)}.")
        return self

    def metadata(self) -> dict[str, str]:
        """The scalars, as safetensors metadata (strings; floats by repr, so they round-trip exactly)."""
        return {"prior": self.prior, "ridge": repr(self.ridge), "damping": repr(self.damping),
                "count": str(self.count), "noise_variance": repr(self.noise_variance)}

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, str],
                   deltas: Mapping[str, Tensor]) -> "Posterior":
        """The posterior saved as ``tensors`` and ``metadata``, checked against the model's ``deltas``; raises
        ValueError saying what is wrong."""
        try:
            scalars = (float(metadata["damping"]), metadata["prior"], float(metadata["ridge"]), int(metadata["count"]),
                       float(metadata["noise_variance"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"The posterior's metadata is incomplete or invalid: {err}") from None
        return cls(dict(tensors), list(deltas), *scalars).check(deltas)
