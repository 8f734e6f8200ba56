"""The raw material of Kronecker factors: what a linear or convolutional layer received and what flowed back to
its output, as rows — one definition for the solver's K-FAC (second moments of the rows) and the posterior (the
per-image Jacobian of a layer's weight, ``Σ_t g_t a_tᵀ`` over its locations, rotated factor by factor).

A layer is an ``F.linear`` / ``F.conv2d`` call, found by intercepting the call (``layer_call``), so that
``padding='same'``, weight sharing and any module structure work. Convolutions follow KFC (Grosse & Martens,
2016): patches from ``unfold``, one row per location; grouped and depthwise convolutions give one group each.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_PARAMETERS = {F.linear: ("input", "weight", "bias"), F.conv2d: ("input", "weight", *_CONV_DEFAULTS)}


def layer_call(func, args: tuple, kwargs: dict | None) -> dict | None:
    """The arguments of an ``F.linear`` / ``F.conv2d`` call by name (``input``, ``weight``, ``bias`` and the
    convolution's), or None for any other function."""
    if func not in _PARAMETERS:
        return None
    return {**_CONV_DEFAULTS, **dict(zip(_PARAMETERS[func], args)), **(kwargs or {})}


def input_rows(func, call: dict, with_bias: bool) -> tuple[Tensor, int, int]:
    """The layer's inputs as rows ``[M, groups, d_in (+1)]`` (``M``: samples × locations, sample-major; a ones
    column for the bias), its number of groups, and the channel dimension of its output."""
    x = call["input"].detach()
    if func is F.linear:
        return linear_rows(x, with_bias), 1, -1
    rows = conv_rows(x, call["weight"].shape, call["stride"], call["padding"], call["dilation"], call["groups"], with_bias)
    return rows, call["groups"], 1


def linear_rows(x: Tensor, with_bias: bool) -> Tensor:
    """Inputs of ``F.linear`` as rows: ``x [..., d_in] -> [M, 1, d_in (+1)]`` (one group)."""
    rows = x.reshape(-1, 1, x.shape[-1])
    return _append_ones(rows) if with_bias else rows


def conv_rows(x: Tensor, weight_shape: torch.Size, stride, padding, dilation, groups: int, with_bias: bool) -> Tensor:
    """Patches of ``F.conv2d`` as rows: ``x [N, C, H, W] -> [N·T, groups, C/groups·kh·kw (+1)]``."""
    kernel = weight_shape[-2:]
    if isinstance(padding, str):
        padding = _numeric_padding(padding, kernel, dilation)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C·kh·kw, T]
    n, k, t = patches.shape
    rows = patches.reshape(n, groups, k // groups, t).permute(0, 3, 1, 2).reshape(n * t, groups, k // groups)
    return _append_ones(rows) if with_bias else rows


def output_rows(grad: Tensor, groups: int, channel_dim: int) -> Tensor:
    """Output gradients as rows: ``[N, C_out, ...]`` (conv) or ``[..., C_out]`` -> ``[M, groups, C_out/groups]``."""
    if channel_dim != -1:
        grad = grad.movedim(channel_dim, -1)
    return grad.reshape(-1, groups, grad.shape[-1] // groups)


def _append_ones(rows: Tensor) -> Tensor:
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)


def _numeric_padding(padding: str, kernel, dilation) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    if any(t % 2 for t in total):
        raise ValueError("K-FAC supports padding='same' only for odd effective kernel sizes.")
    return tuple(t // 2 for t in total)
