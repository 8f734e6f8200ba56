"""The linearized forward pass: f(x; w0) + J·δ, whose gradient Jᵀr costs one ordinary backward pass.

Forward-mode AD gives J·δ: every linearized parameter becomes a dual tensor (primal w0, tangent δ).
The naive way to get a gradient — autograd through the forward-mode computation — differentiates the
tangent formulas (2.2–2.6x a fine-tuning step on an H200). Here the tangent is *detached*, and the primal
parameters are ``w0 + (δ − sg(δ))``: numerically exactly w0, but the ordinary backward pass through the
primal graph now lands on δ. That backward is Jᵀr at w0 — the gradient of ``f0 + J·δ`` — computed by the
same kernels as a fine-tuning step.

Cost per step, in units of one forward pass: primal 1 + tangent 2 (each linear layer needs W·ẋ and δW·x)
+ backward 2 = 5, against 3 for fine-tuning; 5/3 is the floor for exact whole-network linearization.
"""

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

NetworkCall = Callable[[Mapping[str, Tensor]], Tensor]
"""The network as a function of some of its parameters: ``{name: tensor} -> output`` (others stay fixed)."""


def point_parameters(w0: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``w0 + (δ − sg(δ))``: exactly w0 in value, but gradients taken through it land on δ."""
    return {n: w0[n] + (d - d.detach()) for n, d in deltas.items()}


def linearized(call: NetworkCall, w0: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> Tensor:
    """The network linearized around ``w0`` in the parameters named by ``deltas``: ``f(w0) + J·δ``.

    The gradient of the result w.r.t. each δ is ``Jᵀ·grad_output`` evaluated at w0.
    """
    _load_jvp_decompositions()
    with fwAD.dual_level(), _autocast_tangent_dtypes(), _skip_tangent_saves():
        point = point_parameters(w0, deltas)
        duals = {n: fwAD.make_dual(p, deltas[n].detach()) for n, p in point.items()}
        primal, tangent = fwAD.unpack_dual(call(duals))
    return primal if tangent is None else primal + tangent.detach()


@functools.cache
def _load_jvp_decompositions() -> None:
    """Load what forward-mode AD loads on its first dual tensor, without the ``torch.jit.script is deprecated``
    FutureWarning that torch's own module raises there (``torch._decomp.decompositions_for_jvp`` scripts its
    decompositions): users cannot act on it. Other warnings pass, and the module is then cached."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def nonlinear(call: NetworkCall, w0: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> Tensor:
    """The network itself with the named parameters moved to ``w0 + δ``."""
    return call({n: w0[n] + d for n, d in deltas.items()})


class _Unsaved:
    """Stands in for a tensor that only the (never run) backward of a tangent formula would read."""


_UNSAVED = _Unsaved()


def _pack(tensor: Tensor) -> Tensor | _Unsaved:
    # Primal activations in the linearized region are dual tensors; a saved tensor that requires grad but
    # has no tangent belongs to a tangent formula, whose backward never runs because the tangent is detached.
    if tensor.requires_grad and fwAD.unpack_dual(tensor).tangent is None:
        return _UNSAVED
    return tensor


def _unpack(saved: Tensor | _Unsaved) -> Tensor:
    if saved is _UNSAVED:
        raise RuntimeError("lqf-hub: the backward pass asked for a tangent-formula tensor; please report this model.")
    return saved


def _skip_tangent_saves() -> contextlib.AbstractContextManager:
    """Saves 15–35% of the memory of a whole-network step: tangent formulas record a graph (their inputs
    require grad) that nothing ever differentiates."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


@contextlib.contextmanager
def forward_mode_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to its math kernel: the fused ones have no forward-mode AD."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class _NormInFloat32(TorchFunctionMode):
    """Under autocast, run batch norm in float32 when its input is lower precision than its weight.

    Autocast leaves ``batch_norm`` in the input's dtype, and its forward-mode rule then returns a float32
    tangent for a bfloat16 primal, which the next convolution rejects. Float32 norms are what autocast
    intends for normalisation layers anyway.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            x, *rest = args
            weight = kwargs.get("weight", rest[2] if len(rest) > 2 else None)
            if weight is not None and x.dtype != weight.dtype:
                args = (x.to(weight.dtype), *rest)
        return func(*args, **kwargs)


def _autocast_tangent_dtypes() -> contextlib.AbstractContextManager:
    enabled = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    return _NormInFloat32() if enabled else contextlib.nullcontext()
