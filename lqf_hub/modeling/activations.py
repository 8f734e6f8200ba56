"""Leaky treatment of ReLU-type activations, applied by intercepting calls rather than editing modules.

With plain ReLU a unit that is off at w0 has a zero Jacobian column, so its incoming weights can never
move in the linearized model. ``leaky`` replaces ReLU/ReLU6 by leaky versions (this changes f(x; w0));
``tangent`` keeps the pretrained primal output bit-identical and uses the leaky derivative only in the
Jacobian-vector product and in its transpose (the backward pass).

A ``TorchFunctionMode`` catches both ``nn.ReLU``/``nn.ReLU6`` modules (they call ``F.relu`` and
``F.hardtanh(x, 0, 6)``) and the functional forms models use directly, and leaves the model untouched.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..config import Activation

_RELU_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_RELU6_FUNCS = {F.relu6}
_HARDTANH_FUNCS = {F.hardtanh, F.hardtanh_}


def _leaky_derivative(x: Tensor, slope: float, upper: float | None) -> Tensor:
    """d(leaky act)/dx: 1 inside (0, upper), ``slope`` outside; same convention as ``leaky_relu``."""
    inside = x > 0 if upper is None else (x > 0) & (x < upper)
    return torch.full_like(x, slope).masked_fill_(inside, 1.0)


class _TangentLeaky(torch.autograd.Function):
    """Primal: the original ReLU/ReLU6. JVP and backward: the leaky derivative, computed on first use (a
    forward that nothing differentiates, such as the frozen trunk's, never pays for it) and shared by both."""

    generate_vmap_rule = True  # per-sample Jacobians (``torch.func.vmap`` over images) go through it

    @staticmethod
    def forward(x: Tensor, slope: float, upper: float | None) -> Tensor:
        return F.relu(x) if upper is None else F.hardtanh(x, 0.0, upper)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.slope, ctx.upper = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)  # the jvp rule needs x too (torch.func / forward-mode AD)
        ctx.derivative = None

    @staticmethod
    def _derivative(ctx) -> Tensor:
        if ctx.derivative is None:
            (x,) = ctx.saved_tensors
            ctx.derivative = _leaky_derivative(x.detach(), ctx.slope, ctx.upper)
        return ctx.derivative

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * _TangentLeaky._derivative(ctx), None, None

    @staticmethod
    def jvp(ctx, x_tangent: Tensor, *_) -> Tensor:
        return x_tangent * _TangentLeaky._derivative(ctx)


def leaky_relu6(x: Tensor, slope: float) -> Tensor:
    """ReLU6 with leaky ends: slope below 0 and above 6, identity in between."""
    return torch.where(x < 0, x * slope, torch.where(x > 6, 6 + (x - 6) * slope, x))


class ActivationMode(TorchFunctionMode):
    """Within this context, ReLU and ReLU6 calls follow ``mode`` (leaky or tangent). Counts the calls."""

    def __init__(self, mode: Activation, slope: float) -> None:
        super().__init__()
        if mode is Activation.NONE:
            raise ValueError("ActivationMode is only for 'leaky' and 'tangent'.")
        self.mode, self.slope, self.calls = mode, slope, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        upper = _relu_upper(func, args, kwargs)
        if upper is False:
            return func(*args, **kwargs)
        self.calls += 1
        x = args[0] if args else kwargs["input"]
        if self.mode is Activation.TANGENT:
            return _TangentLeaky.apply(x, self.slope, upper)
        return F.leaky_relu(x, self.slope) if upper is None else leaky_relu6(x, self.slope)


def _relu_upper(func, args, kwargs) -> float | None | bool:
    """None for a ReLU call, 6.0 for a ReLU6 call, False for anything else."""
    if func in _RELU_FUNCS:
        return None
    if func in _RELU6_FUNCS:
        return 6.0
    if func in _HARDTANH_FUNCS:
        lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return 6.0 if (lo, hi) == (0.0, 6.0) else False
    return False


def count_relu_modules(module: nn.Module) -> int:
    """How many ReLU/ReLU6 modules a network holds (the calls ``ActivationMode`` is expected to see)."""
    return sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in module.modules())
