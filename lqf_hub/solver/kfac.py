"""K-FAC for the linearized model, computed once at w0: the curvature of a linear model does not change.

For the loss ``mean_i ½‖f_lin(x_i) − α·y_i‖² + (λ/2)‖δ‖²`` the Hessian is ``G + λI`` with
``G = E_i[J_iᵀJ_i]`` the Gauss–Newton matrix of the network at w0. K-FAC approximates G block by block:

* every ``F.linear`` / ``F.conv2d`` call whose weight is linearized gives a Kronecker block ``A ⊗ B`` per
  group of channels (``A``: second moment of the layer inputs, with a ones entry for the bias;
  ``B``: second moment of the back-propagated output vectors, summed over the C outputs — exactly, by one
  backward pass per output, or from random output vectors). Convolutions follow KFC (Grosse & Martens,
  2016): patches from ``unfold``, locations treated as extra samples; grouped and depthwise
  convolutions get one block per group.
* every other linearized tensor gets the diagonal of G from per-sample gradients, so it is exact in
  ``"exact"`` mode and does not depend on how a batch is split across processes. Scales and shifts of
  ``F.batch_norm`` / ``F.layer_norm`` / ``F.group_norm`` get them from the same backward passes (the
  normalized input times the output gradient); anything else (layer scales, embeddings) from an extra
  batched backward pass per output.

Blocks are inverted through their eigendecompositions with the damping applied to the Kronecker
eigenvalues exactly: ``(A ⊗ B + γI)⁻¹`` with ``γ = λ + damping · mean eigenvalue of the block``
(eigendecompositions in float64; a non-finite factor or result raises CurvatureError naming the layer).
The layer calls are found by intercepting ``F.linear`` / ``F.conv2d`` (so ``padding='same'`` convs,
weight sharing and any module structure work) and matching the weight tensor the network received.
"""

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import CurvatureError
from ..modeling.kfac_state import BlockState, kfac_state, parse_kfac_state
from ..modeling.layer_rows import input_rows, layer_call, output_rows

NetworkCall = Callable[[Mapping[str, Tensor]], Tensor]


# ---------------------------------------------------------------------------------------------- math
def second_moment(rows: Tensor) -> Tensor:
    """``Σ_m r_m r_mᵀ`` per group: ``[M, groups, k] -> [groups, k, k]``."""
    return torch.einsum("mgi,mgj->gij", rows, rows)


def kronecker_inverse_apply(
    grad: Tensor, eig_a: Tensor, basis_a: Tensor, eig_b: Tensor, basis_b: Tensor, damping: float | Tensor,
    power: float = 1.0,
) -> Tensor:
    """``(A ⊗ B + γI)^-power vec(V)`` per group with ``A = Qa diag(ea) Qaᵀ``, ``B = Qb diag(eb) Qbᵀ``.

    ``grad [groups, d_out, d_in]``, ``eig_a [groups, d_in]``, ``basis_a [groups, d_in, d_in]``,
    ``eig_b [groups, d_out]``, ``basis_b [groups, d_out, d_out]`` -> ``[groups, d_out, d_in]``.
    """
    rotated = basis_b.transpose(-1, -2) @ grad @ basis_a
    rotated = rotated / (eig_b.unsqueeze(-1) * eig_a.unsqueeze(-2) + damping).pow(power)
    return basis_b @ rotated @ basis_a.transpose(-1, -2)


def symmetric_eigh(matrix: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of symmetric positive semi-definite ``[groups, k, k]`` factors: eigenvalues
    ``[groups, k]`` (clamped at 0) and orthonormal eigenvectors ``[groups, k, k]``, in ``matrix``'s dtype.

    Computed in float64 on the matrix scaled to max-abs 1 (output-gradient factors have entries of 1e-5).
    LAPACK's divide-and-conquer (torch) can fail on rank-deficient factors (few samples, many zero
    eigenvalues), in float64 too and depending on the thread count and device, by raising or by returning
    NaN without raising; the QR algorithm (scipy's ``ev`` driver) is slower but does not.
    ``name`` says which factor, for the error.
    """
    wide = matrix.detach().double()
    scale = wide.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)  # a zero matrix: zero eigenvalues, any orthonormal basis
    scaled = (wide + wide.transpose(-1, -2)) / (2 * scale)
    try:
        eigenvalues, vectors = torch.linalg.eigh(scaled)
        finite = bool(torch.isfinite(eigenvalues).all() & torch.isfinite(vectors).all())
    except torch.linalg.LinAlgError:
        finite = False
    if not finite:
        eigenvalues, vectors = _eigh_qr(scaled, name)
    eigenvalues = (eigenvalues * scale.squeeze(-1)).clamp_min(0)
    # contiguous: torch returns column-major eigenvectors, which safetensors would refuse
    return eigenvalues.to(matrix.dtype).contiguous(), vectors.to(matrix.dtype).contiguous()


def _eigh_qr(matrix: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """scipy's QR-algorithm eigendecomposition of float64 ``[groups, k, k]``, returned on ``matrix``'s device."""
    import scipy.linalg

    failure = CurvatureError(
        f"Could not eigendecompose the {name}: LAPACK returned non-finite values even in float64 with the QR "
        "algorithm. Please report the model and data; meanwhile train with preconditioner='none' / prior='isotropic'."
    )
    try:
        pairs = [scipy.linalg.eigh(m, driver="ev") for m in matrix.detach().cpu().numpy()]
    except (scipy.linalg.LinAlgError, ValueError) as error:
        raise failure from error
    eigenvalues, vectors = (torch.from_numpy(np.stack(part)).to(matrix.device) for part in zip(*pairs))
    if not bool(torch.isfinite(eigenvalues).all() & torch.isfinite(vectors).all()):
        raise failure
    return eigenvalues, vectors


def _require_finite(factor: Tensor, name: str) -> None:
    """Refuse a non-finite curvature statistic before it reaches LAPACK (one host sync)."""
    if not bool(torch.isfinite(factor).all()):
        raise CurvatureError(
            f"The K-FAC {name} is not finite: the data or the model produce non-finite activations or "
            "gradients. Check the inputs for NaN/Inf and run the model in float32 or float64 rather than "
            "half precision."
        )


# ------------------------------------------------------------------------------------ layer capture
@dataclass
class _Block:
    """One Kronecker block: a linearized weight (and bias) used by F.linear / F.conv2d."""

    weight: str
    bias: str | None
    groups: int
    a_sum: Tensor | None = None  # Σ rows rowsᵀ over inputs  [groups, d_in, d_in]
    a_count: float = 0.0  # number of rows (samples x locations)
    b_sum: Tensor | None = None  # Σ weighted output-gradient outer products  [groups, d_out, d_out]
    eig: dict[str, Tensor] = field(default_factory=dict)


_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_NORM_PARAMETERS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
}


class _LayerCapture(TorchFunctionMode):
    """Records inputs (into A) and hooks outputs (for B) of the F.linear / F.conv2d calls on tracked weights,
    and hooks the outputs of norm calls with tracked scales or shifts (for their per-sample gradients)."""

    def __init__(self, kfac: "KFAC", names_by_id: dict[int, str], batch_size: int) -> None:
        super().__init__()
        self.kfac, self.names_by_id, self.batch_size = kfac, names_by_id, batch_size

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _NORM_PARAMETERS:
            self._norm(func, {**_NORM_DEFAULTS, **dict(zip(_NORM_PARAMETERS[func], args)), **kwargs}, out)
        call = layer_call(func, args, kwargs)
        if call is None:
            return out
        name = self.names_by_id.get(id(call["weight"]))
        if name is None:
            return out
        bias = call["bias"]
        bias_name = None if bias is None else self.names_by_id.get(id(bias))
        rows, groups, channel_dim = input_rows(func, call, bias_name is not None)
        block = self.kfac._block(name, bias_name, groups)
        moment = second_moment(rows.to(self.kfac.dtype))
        block.a_sum = moment if block.a_sum is None else block.a_sum + moment
        block.a_count += rows.shape[0]
        if out.requires_grad:
            out.register_hook(lambda grad: self.kfac._add_output_grad(block, grad, groups, channel_dim))
        return out

    def _norm(self, func, call: dict, out: Tensor) -> None:
        """``out = x̂·weight + bias`` per sample: the gradients are ``Σ g·x̂`` and ``Σ g`` over the other dims."""
        names = {k: self.names_by_id.get(id(call[k])) for k in ("weight", "bias") if call[k] is not None}
        names = {k: n for k, n in names.items() if n is not None}
        x = call["input"]
        if not names or not out.requires_grad or call["training"] or x.shape[0] != self.batch_size:
            return  # untracked, or not one row per sample: the batched pass covers it
        if func is F.batch_norm:
            normalized = F.batch_norm(x.detach(), call["running_mean"], call["running_var"], eps=call["eps"])
            kept = (0, 1)
        elif func is F.layer_norm:
            normalized = F.layer_norm(x.detach(), call["normalized_shape"], eps=call["eps"])
            kept = (0, *range(x.ndim - len(call["normalized_shape"]), x.ndim))
        else:
            normalized = F.group_norm(x.detach(), call["num_groups"], eps=call["eps"])
            kept = (0, 1)
        summed = [d for d in range(x.ndim) if d not in kept]
        normalized = normalized.to(self.kfac.dtype)
        self.kfac.norm_names.update(names.values())

        def per_sample(grad: Tensor) -> None:
            if self.kfac._pass_weight is None:
                return
            grad = grad.detach().to(self.kfac.dtype)
            parts = {"weight": grad * normalized, "bias": grad}
            # (sum over an empty list of dims would sum everything)
            self.kfac._add_per_sample({n: parts[k].sum(summed) if summed else parts[k] for k, n in names.items()})

        out.register_hook(per_sample)


# ------------------------------------------------------------------------------------------- K-FAC
class KFAC:
    """Damped inverse of a Kronecker-factored ``E[JᵀJ]`` at w0, applied to the gradients of δ.

    Usage: ``accumulate`` over some batches, ``finalize`` once (all-reduces across processes), then
    ``precondition`` after every backward pass. ``outputs``: ``"exact"`` back-propagates each of the C
    outputs (C backward passes per batch), ``"sampled"`` uses ``samples`` Gaussian output vectors.
    """

    def __init__(
        self,
        w0: Mapping[str, Tensor],
        deltas: Mapping[str, Tensor],
        *,
        ridge: float,
        damping: float,
        outputs: str = "exact",
        samples: int = 1,
        seed: int = 0,
    ) -> None:
        if outputs not in ("exact", "sampled"):
            raise ValueError(f"`outputs` must be 'exact' or 'sampled', got {outputs!r}.")
        if not damping >= 0:
            raise ValueError(f"`damping` must be >= 0, got {damping}.")
        self.w0, self.deltas = dict(w0), dict(deltas)
        self.ridge, self.damping, self.outputs, self.samples = ridge, damping, outputs, samples
        self.seed, self.generator = seed, torch.Generator().manual_seed(seed)
        self.dtype = torch.float64 if next(iter(self.deltas.values())).dtype == torch.float64 else torch.float32
        self.blocks: dict[str, _Block] = {}
        self.diag_sum: dict[str, Tensor] = {}
        self.diag_eig: dict[str, Tensor] = {}
        self.num_samples = 0.0
        self.norm_names: set[str] = set()  # scales and shifts whose per-sample gradients the norm hooks give
        self._pass_weight: float | None = 1.0  # None: a pass that must not reach the statistics
        self._per_sample: dict[str, Tensor] = {}
        self.finalized = False

    # ------------------------------------------------------------------------ statistics at w0
    def accumulate(self, call: NetworkCall, batch_size: int, keys: Tensor | None = None) -> None:
        """Add one batch: ``call(params) -> outputs [B, C]`` evaluates the network with given parameters.

        ``keys [B, k]`` (uint8, e.g. content digests): in ``"sampled"`` mode each sample's output vectors are
        drawn from a generator seeded by its key, so the statistics do not depend on the order of the
        samples or on how they are split across processes.
        """
        if self.finalized:
            raise RuntimeError("K-FAC is already finalized; create a new one to recompute the curvature.")
        point = {n: self.w0[n] + (d - d.detach()) for n, d in self.deltas.items()}
        with _LayerCapture(self, {id(t): n for n, t in point.items()}, batch_size):
            outputs = call(point)
        if outputs.ndim != 2 or outputs.shape[0] != batch_size:
            raise ValueError(f"K-FAC expects network outputs [batch, classes], got {list(outputs.shape)}.")
        others = {n: t for n, t in point.items() if not self._in_block(n) and n not in self.norm_names}
        for vectors, weight in self._output_vectors(outputs, keys):
            self._pass_weight, self._per_sample = weight, {}
            # asking for every parameter's gradient makes the pass reach every hooked layer output
            torch.autograd.grad((outputs * vectors).sum(), list(point.values()), retain_graph=True, allow_unused=True)
            if others:
                self._others_per_sample(outputs, vectors, others)
            for name, grads in self._per_sample.items():
                square = weight * grads.square().sum(0)
                self.diag_sum[name] = self.diag_sum.get(name, 0) + square
        self.num_samples += batch_size

    def _others_per_sample(self, outputs: Tensor, vectors: Tensor, tensors: dict[str, Tensor]) -> None:
        """Per-sample gradients of ``tensors`` by batched backward passes, ``_CHUNK`` samples at a time."""
        self._pass_weight, weight = None, self._pass_weight  # the hooks must not count these passes
        rows = torch.eye(outputs.shape[0], dtype=outputs.dtype, device=outputs.device).unsqueeze(-1) * vectors
        chunks: dict[str, list[Tensor]] = {}
        for chunk in rows.split(self._CHUNK):  # [k, B, C]: the vectors of k samples, zero elsewhere
            grads = torch.autograd.grad(outputs, list(tensors.values()), grad_outputs=chunk, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
            for name, grad in zip(tensors, grads):
                if grad is not None:
                    chunks.setdefault(name, []).append(grad.detach().to(self.dtype))
        self._pass_weight = weight
        self._add_per_sample({name: torch.cat(parts) for name, parts in chunks.items()})

    _CHUNK = 8  # a batched backward pass holds this many copies of the batch's gradients

    def _add_per_sample(self, grads: Mapping[str, Tensor]) -> None:
        """Per-sample gradients ``[B, *shape]`` from this pass, summed over every use of a tensor."""
        for name, grad in grads.items():
            self._per_sample[name] = grad + self._per_sample[name] if name in self._per_sample else grad

    def _output_vectors(self, outputs: Tensor, keys: Tensor | None):
        classes = outputs.shape[1]
        if self.outputs == "exact":  # one pass per output
            for c in range(classes):
                vectors = torch.zeros_like(outputs)
                vectors[:, c] = 1
                yield vectors, 1.0
            return
        if keys is None:
            drawn = torch.randn(self.samples, *outputs.shape, generator=self.generator)
        else:
            if len(keys) != len(outputs):
                raise ValueError(f"K-FAC got {len(keys)} keys for {len(outputs)} samples.")
            drawn = torch.stack([torch.randn(self.samples, classes, generator=self._keyed_generator(key))
                                 for key in keys.cpu()], dim=1)
        for vectors in drawn:
            yield vectors.to(outputs), 1.0 / self.samples

    def _keyed_generator(self, key: Tensor) -> torch.Generator:
        digest = hashlib.sha256(self.seed.to_bytes(8, "little", signed=True) + key.numpy().tobytes()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def _block(self, weight: str, bias: str | None, groups: int) -> _Block:
        block = self.blocks.get(weight)
        if block is None:
            block = self.blocks[weight] = _Block(weight, bias, groups)
        elif (block.bias, block.groups) != (bias, groups):
            raise ValueError(f"{weight} is used by layers of different shapes; K-FAC cannot share one block.")
        return block

    def _add_output_grad(self, block: _Block, grad: Tensor, groups: int, channel_dim: int) -> None:
        if self._pass_weight is None:
            return
        moment = self._pass_weight * second_moment(output_rows(grad.detach(), groups, channel_dim).to(self.dtype))
        block.b_sum = moment if block.b_sum is None else block.b_sum + moment

    def _in_block(self, name: str) -> bool:
        return name in self.blocks or any(b.bias == name for b in self.blocks.values())

    # --------------------------------------------------------------------------- inversion
    def finalize(self, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """Average the statistics (summed over processes by ``reduce_sum``) and eigendecompose the blocks."""
        reduce_sum = reduce_sum or (lambda t: t)
        count = reduce_sum(torch.tensor([self.num_samples], dtype=torch.float64))
        n = float(count.item())
        if n == 0:
            raise RuntimeError("K-FAC saw no samples; call accumulate() on some batches first.")
        for block in self.blocks.values():
            if block.b_sum is None:
                raise RuntimeError(f"No output gradient reached {block.weight}; is it used by the network output?")
            rows = float(reduce_sum(torch.tensor([block.a_count], dtype=torch.float64)).item())
            a = reduce_sum(block.a_sum) / rows  # mean over samples and locations
            b = reduce_sum(block.b_sum) / n  # sum over locations and outputs, mean over samples
            _require_finite(a, f"input factor A of {block.weight}")
            _require_finite(b, f"output-gradient factor B of {block.weight}")
            eig_a, basis_a = symmetric_eigh(a, f"K-FAC input factor A of {block.weight}")
            eig_b, basis_b = symmetric_eigh(b, f"K-FAC output-gradient factor B of {block.weight}")
            eig = {"eig_a": eig_a, "basis_a": basis_a, "eig_b": eig_b, "basis_b": basis_b}
            block.eig = {k: v.to(self.dtype) for k, v in eig.items()}
            block.a_sum = block.b_sum = None
        for name, total in self.diag_sum.items():
            self.diag_eig[name] = reduce_sum(total) / n
            _require_finite(self.diag_eig[name], f"diagonal curvature of {name}")
        self.diag_sum = {}
        missing = [n for n in self.deltas if not self._in_block(n) and n not in self.diag_eig]
        for name in missing:  # tensors no output depends on: only the ridge acts on them
            self.diag_eig[name] = torch.zeros_like(self.deltas[name], dtype=self.dtype)
        self.finalized = True

    def remove(self, share: "KFAC", count: int, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """Take the images ``share`` has accumulated (not finalized) out of this finalized K-FAC over ``count``
        images, in place: the K-FAC of the others, up to rounding, without a pass over them.

        The factors are sums over images, and in "sampled" mode each image's output vectors are drawn from its
        content key, so ``share`` holds exactly what those images added, provided it was built like this one
        (outputs, samples, seed) with the same keys. Every image must give a layer the same number of rows
        (locations), as cached trunk outputs of one size do. ``reduce_sum`` sums ``share`` over processes.
        """
        if not self.finalized or share.finalized:
            raise RuntimeError("remove() takes a finalized K-FAC and the accumulated, unfinalized share to remove.")
        if (share.outputs, share.samples, share.seed) != (self.outputs, self.samples, self.seed):
            raise ValueError("The share to remove was built with other outputs, samples or seed than this K-FAC.")
        reduce_sum = reduce_sum or (lambda t: t)
        removed = float(reduce_sum(torch.tensor([share.num_samples], dtype=torch.float64)).item())
        if not 0 < removed < count:
            raise ValueError(f"Cannot remove {removed:g} of {count} images: keep at least one, remove at least one.")
        if set(share.blocks) != set(self.blocks) or set(share.diag_sum) - set(self.diag_eig):
            raise ValueError("The share to remove covers other layers than this K-FAC.")
        kept = count - removed
        for name, block in self.blocks.items():
            part = share.blocks[name]
            rows = float(reduce_sum(torch.tensor([part.a_count], dtype=torch.float64)).item())
            e = {k: v.double() for k, v in block.eig.items()}
            # the stored factors are means: back to sums over all images (A over their rows), less the share
            a = (e["basis_a"] * e["eig_a"].unsqueeze(-2)) @ e["basis_a"].transpose(-1, -2)
            b = (e["basis_b"] * e["eig_b"].unsqueeze(-2)) @ e["basis_b"].transpose(-1, -2)
            a = (a * (rows / removed * count) - reduce_sum(part.a_sum).double()) / (rows / removed * kept)
            b = (b * count - reduce_sum(part.b_sum).double()) / kept
            eig_a, basis_a = symmetric_eigh(a, f"K-FAC input factor A of {name}")
            eig_b, basis_b = symmetric_eigh(b, f"K-FAC output-gradient factor B of {name}")
            block.eig = {k: v.to(self.dtype) for k, v in
                         {"eig_a": eig_a, "basis_a": basis_a, "eig_b": eig_b, "basis_b": basis_b}.items()}
        for name, diag in self.diag_eig.items():
            if name in share.diag_sum:
                self.diag_eig[name] = ((diag.double() * count - reduce_sum(share.diag_sum[name]).double()) / kept
                                       ).clamp_min(0).to(self.dtype)

    def precondition(self, grads: Mapping[str, Tensor], power: float = 1.0) -> None:
        """Replace each gradient (network name -> tensor shaped like its δ) by ``(K + γ)^-power grad``, in place.

        Raises CurvatureError, naming the layers, when a finite gradient comes out non-finite (a non-finite
        gradient is the trainer's to report). One host sync per call, not per layer.
        """
        if not self.finalized:
            raise RuntimeError("Call KFAC.finalize() before preconditioning.")
        finite: dict[str, Tensor] = {}  # name -> "the result is finite, or the gradient was not"
        for block in self.blocks.values():
            weight, bias = grads.get(block.weight), grads.get(block.bias) if block.bias else None
            if weight is None:
                continue
            e = {k: v.to(weight.device) for k, v in block.eig.items()}
            damping = self.ridge + self.damping * e["eig_a"].mean() * e["eig_b"].mean()  # a tensor: no sync per step
            matrix = weight.reshape(block.groups, weight.shape[0] // block.groups, -1).to(self.dtype)
            if block.bias:  # a bias missing from ``grads`` counts as a zero gradient
                column = matrix.new_zeros(*matrix.shape[:2], 1) if bias is None else bias.reshape(block.groups, -1, 1)
                matrix = torch.cat([matrix, column.to(self.dtype)], dim=-1)
            solved = kronecker_inverse_apply(matrix, e["eig_a"], e["basis_a"], e["eig_b"], e["basis_b"], damping, power)
            finite[block.weight] = torch.isfinite(solved).all() | ~torch.isfinite(matrix).all()
            if block.bias:
                if bias is not None:
                    bias.copy_(solved[..., -1].reshape(bias.shape))
                solved = solved[..., :-1]
            weight.copy_(solved.reshape(weight.shape))
        for name, diag in self.diag_eig.items():
            if name in grads:
                grad, diag = grads[name], diag.to(grads[name].device)
                given = torch.isfinite(grad).all()
                grad.div_((diag + self.ridge + self.damping * diag.mean()).pow(power).to(grad.dtype))
                finite[name] = torch.isfinite(grad).all() | ~given
        self._require_finite_results(finite)

    def _require_finite_results(self, finite: dict[str, Tensor]) -> None:
        """``finite``: name -> a boolean tensor, on any device; checked with one host sync."""
        if not finite:
            return
        device = next(iter(finite.values())).device
        flags = torch.stack([f.to(device) for f in finite.values()])
        if bool(flags.all()):
            return
        names = [name for name, ok in zip(finite, flags.tolist()) if not ok]
        raise CurvatureError(
            f"The K-FAC-preconditioned gradient of {', '.join(names[:3])} is not finite although the gradient is: "
            f"the damped curvature has zero or non-finite eigenvalues, or is too small for this dtype. Raise the "
            f"ridge (now {self.ridge}) or the damping (now {self.damping})."
        )

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        if not self.finalized:
            raise RuntimeError("Only a finalized K-FAC can be saved.")
        blocks = {name: BlockState(block.eig, block.groups, block.bias) for name, block in self.blocks.items()}
        return kfac_state(blocks, self.diag_eig, list(self.deltas))

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        blocks, self.diag_eig = parse_kfac_state(state, list(self.deltas))
        self.blocks = {name: _Block(name, block.bias, block.groups, eig=block.factors) for name, block in blocks.items()}
        self.finalized = True


def condition_number(kfac: KFAC) -> float:
    """Largest over smallest damped curvature eigenvalue across all blocks (a diagnostic)."""
    eigs = [torch.outer(b.eig["eig_b"].flatten(), b.eig["eig_a"].flatten()).flatten() for b in kfac.blocks.values()]
    eigs += [d.flatten() for d in kfac.diag_eig.values()]
    values = torch.cat(eigs) + kfac.ridge
    return math.inf if values.min() <= 0 else float(values.max() / values.min())
