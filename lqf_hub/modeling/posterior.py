"""The Bayesian reading of LQF: how sure the linearized model is of each output.

LQF is Bayesian linear regression in δ. With Gaussian noise σ² on each α-scaled target and the prior
``δ ~ N(0, σ²/(Nλ) M⁻¹)``, the posterior is Gaussian with mean δ* (what the solver returns) and covariance
``σ²/N · (G + λM)⁻¹`` — the linearized Laplace posterior (Immer et al., AISTATS 2021), exact here rather than
an approximation around a MAP point. For an image x the output is then Gaussian with mean ``f_lin(x)`` and
covariance ``σ²/N · J(x) (G + λM)⁻¹ J(x)ᵀ`` ``[K, K]`` (the GLM predictive).

``(G + λM)⁻¹`` is applied through K-FAC's eigendecompositions at w0 (``G ≈ ⊕_blocks A ⊗ B``, eigenvalues e).
A block's per-image Jacobian ``Σ_t g_t a_tᵀ`` (over the layer's locations t) is never formed in the weight's
coordinates: its factors are rotated, ``Σ_t (Q_Bᵀg_t)(Q_Aᵀa_t)ᵀ``, at ``T(d_out² + d_in²)`` instead of
``d_out·d_in·(d_out + d_in)`` per output.

* K-FAC prior, ``M = K + γ``:  ``G + λM ≈ (1 + λ)·K + λγ``, eigenvalues ``(1 + λ)e + λγ``;
* isotropic prior:             ``G + λI ≈ K + λ``,            eigenvalues ``e + λ``;
* head prior (δ of the backbone held at zero): the head's block of G is exactly ``E[φ̃φ̃ᵀ] ⊗ I`` (K-FAC's input
  factor of the head, which does not depend on how the outputs were sampled), so ``(E[φ̃φ̃ᵀ] + λ)⁻¹ ⊗ I`` is exact.

σ² is the mean squared out-of-fold residual per output (the noise's maximum-likelihood estimate from predictions
of models that did not see those images); N the number of training images.
"""

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .kfac_state import FACTORS, BlockState, parse_kfac_state
from .layer_rows import input_rows, layer_call

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

    def covariance(self, layers: Mapping[str, "LayerGradients"], jacobians: Mapping[str, Tensor]) -> Tensor:
        """``σ²/N · J (G + λM)⁻¹ Jᵀ`` per image: ``[B, K, K]``, in the gradients' dtype. ``layers``: each Kronecker
        block's weight (``layer_names``) -> its ``LayerGradients``; ``jacobians``: network name -> ``[B, K, *shape]``,
        the outputs' derivatives by each tensor outside the blocks (``diagonal_names``) at w0."""
        gram = sum(part @ part.transpose(-1, -2) for part in self._whitened(layers, jacobians))
        return (self.noise_variance / self.count) * gram

    def layer_names(self) -> dict[str, str | None]:
        """The Kronecker blocks ``covariance`` reads: weight name -> bias name or None (the head's alone under the
        head prior)."""
        return {name: block.bias for name, block in self._blocks.items()}

    def diagonal_names(self) -> list[str]:
        """The tensors outside the blocks whose Jacobians ``covariance`` reads (none under the head prior)."""
        return list(self._diagonals)

    def _whitened(self, layers: Mapping[str, "LayerGradients"], jacobians: Mapping[str, Tensor]) -> Iterator[Tensor]:
        """``(G + λM)^-½ Jᵀ`` in K-FAC's eigenbases, one ``[B, K, p]`` part per block or diagonal tensor (their
        Gram matrices add up: no concatenated copy of every part)."""
        for name, block in self._blocks.items():
            layer = layers[name]
            dtype = layer.inputs.dtype  # float32 sums of squares: no cancellation to fear
            eig_a, basis_a, eig_b, basis_b = (block.factors[k].to(layer.inputs.device, dtype) for k in FACTORS)
            inputs = torch.einsum("btgi,gij->btgj", layer.inputs, basis_a)
            outputs = layer.outputs.to(dtype)
            if self.prior == "head":  # the head's block of G is exactly E[φ̃φ̃ᵀ] ⊗ I
                eigenvalues, mean = eig_a.unsqueeze(-2), eig_a.mean()
            else:
                outputs = torch.einsum("bktgo,gop->bktgp", outputs, basis_b)
                eigenvalues, mean = eig_b.unsqueeze(-1) * eig_a.unsqueeze(-2), eig_a.mean() * eig_b.mean()
            rotated = torch.einsum("bktgp,btgj->bkgpj", outputs, inputs)  # [B, K, groups, d_out, d_in (+1)]
            yield rotated.div_(self._damped(eigenvalues, mean).sqrt_()).flatten(2)
        for name, diag in self._diagonals.items():
            values = jacobians[name].flatten(2)
            diag = diag.to(values.device, values.dtype).flatten()
            yield values / self._damped(diag, diag.mean()).sqrt()

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


@dataclass
class LayerGradients:
    """What a linear or convolutional layer gives each image's Jacobian of its weight, ``Σ_t g_t a_tᵀ``: its input
    rows ``inputs [B, T, groups, d_in (+1)]`` (a ones column for a bias) and the gradients of each network output at
    its output ``outputs [B, K, T, groups, d_out]``, over its T locations (or uses, for a shared weight)."""

    inputs: Tensor
    outputs: Tensor


def layer_gradients(call: Callable[[Mapping[str, Tensor]], Tensor], point: Mapping[str, Tensor],
                    layers: Mapping[str, str | None]) -> dict[str, LayerGradients]:
    """``LayerGradients`` of the layers whose weights are ``layers`` (weight name -> bias name or None), from
    ``call(point) -> [B, K]`` (the network as a function of its parameters; ``point`` requiring gradients) and one
    backward pass per output. Images must not interact (no batch statistics)."""
    with _LayerRecorder({id(point[name]): name for name in layers}, layers) as recorder:
        outputs = call(point)
    if not recorder.calls:
        return {}
    layer_outputs = [out for _, _, out, _, _ in recorder.calls]
    per_output = []
    for k in range(outputs.shape[1]):
        grads = torch.autograd.grad(outputs[:, k].sum(), layer_outputs, retain_graph=True, allow_unused=True)
        per_output.append([torch.zeros_like(out) if g is None else g for g, out in zip(grads, layer_outputs)])
    found: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for i, (name, inputs, out, groups, channel_dim) in enumerate(recorder.calls):
        grads = torch.stack([grads[i] for grads in per_output], dim=1)  # [B, K, *out.shape[1:]]
        if channel_dim != -1:
            grads = grads.movedim(channel_dim + 1, -1)
        grads = grads.reshape(*grads.shape[:2], -1, groups, grads.shape[-1] // groups)
        found.setdefault(name, []).append((inputs, grads.detach()))
    return {name: LayerGradients(torch.cat([i for i, _ in uses], dim=1), torch.cat([g for _, g in uses], dim=2))
            for name, uses in found.items()}


class _LayerRecorder(TorchFunctionMode):
    """Records each ``F.linear`` / ``F.conv2d`` call on a tracked weight: its name, input rows ``[B, T, groups,
    d_in (+1)]``, output, groups and output channel dimension."""

    def __init__(self, names_by_id: dict[int, str], layers: Mapping[str, str | None]) -> None:
        super().__init__()
        self.names_by_id, self.layers = names_by_id, layers
        self.calls: list[tuple[str, Tensor, Tensor, int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        call = layer_call(func, args, kwargs)
        name = None if call is None else self.names_by_id.get(id(call["weight"]))
        if name is not None:
            rows, groups, channel_dim = input_rows(func, call, self.layers[name] is not None)
            self.calls.append((name, rows.reshape(call["input"].shape[0], -1, *rows.shape[1:]), out, groups, channel_dim))
        return out
