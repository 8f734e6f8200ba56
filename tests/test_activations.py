"""Leaky / tangent activation treatment against hand-written Jacobians."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lqf_hub.config import Activation
from lqf_hub.modeling.activations import ActivationMode, leaky_relu6
from lqf_hub.modeling.linearize import linearized

SLOPE = 0.1


def leaky_derivative(z: torch.Tensor, upper: float | None = None) -> torch.Tensor:
    inside = z > 0 if upper is None else (z > 0) & (z < upper)
    return torch.where(inside, torch.ones_like(z), torch.full_like(z, SLOPE))


@pytest.mark.parametrize("act, upper", [(nn.ReLU(), None), (nn.ReLU(inplace=True), None), (nn.ReLU6(), 6.0)])
def test_tangent_mode_jacobian_of_two_layer_net(act, upper):
    """f = W2 act(W1 x + b1): primal uses act itself, J·δ uses the leaky derivative (by hand)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 3)).double()
    x = 4 * torch.randn(5, 4, dtype=torch.float64)
    deltas = {n: torch.randn_like(p, requires_grad=True) for n, p in net.named_parameters()}
    with ActivationMode(Activation.TANGENT, SLOPE) as mode:
        out = linearized(lambda p: functional_call(net, p, (x,)), dict(net.named_parameters()), deltas)
    assert mode.calls == 1
    w1, b1, w2, b2 = (p.detach() for p in net.parameters())
    d1, db1, d2, db2 = deltas.values()
    z = x @ w1.T + b1
    h = F.relu(z) if upper is None else F.relu6(z)
    expected = h @ w2.T + b2 + h @ d2.T + db2 + (leaky_derivative(z, upper) * (x @ d1.T + db1)) @ w2.T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # the gradient is the transpose of the same Jacobian: compare with autograd through `expected`
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), list(deltas.values()))
    reference = torch.autograd.grad((expected * weights).sum(), list(deltas.values()))
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_leaky_mode_replaces_module_and_functional_forms():
    x = torch.linspace(-10, 10, 41, dtype=torch.float64)
    calls = [
        lambda t: nn.ReLU()(t), lambda t: nn.ReLU6()(t), lambda t: F.relu(t), lambda t: torch.relu(t),
        lambda t: t.relu(), lambda t: F.relu6(t), lambda t: F.hardtanh(t, 0.0, 6.0),
    ]
    expected = [F.leaky_relu(x, SLOPE), leaky_relu6(x, SLOPE)] + [F.leaky_relu(x, SLOPE)] * 3 + [leaky_relu6(x, SLOPE)] * 2
    with ActivationMode(Activation.LEAKY, SLOPE) as mode:
        outputs = [call(x) for call in calls]
        untouched = F.hardtanh(x)  # a true hardtanh (-1, 1) is not a ReLU6
    assert mode.calls == len(calls)
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref)
    torch.testing.assert_close(untouched, x.clamp(-1, 1))


def test_leaky_relu6_shape():
    x = torch.tensor([-2.0, 0.0, 3.0, 6.0, 8.0], dtype=torch.float64)
    torch.testing.assert_close(leaky_relu6(x, SLOPE), torch.tensor([-0.2, 0.0, 3.0, 6.0, 6.2], dtype=torch.float64))


def test_tangent_primal_is_bit_identical():
    x = torch.randn(1000) * 5
    with ActivationMode(Activation.TANGENT, SLOPE):
        relu, relu6 = F.relu(x), F.relu6(x)
    assert torch.equal(relu, F.relu(x)) and torch.equal(relu6, F.relu6(x))


def test_smooth_activations_are_left_alone():
    x = torch.randn(100)
    with ActivationMode(Activation.LEAKY, SLOPE) as mode:
        out = F.gelu(x) + F.silu(x)
    assert mode.calls == 0 and torch.equal(out, F.gelu(x) + F.silu(x))
