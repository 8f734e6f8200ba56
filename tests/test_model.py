"""LQFModel against independent references, for every adapter family, in float64."""

import pytest
import torch
from conftest import FAMILIES, RELU_FAMILIES, build, original_copy, pretrained_network
from torch.func import functional_call, jvp

from lqf_hub import LQFConfig, LQFModel
from lqf_hub.modeling.linearize import forward_mode_attention

GELU_FAMILIES = [f for f in FAMILIES if f not in RELU_FAMILIES]


def reference_linearized(model: LQFModel, x: torch.Tensor, tangents: dict | None = None) -> torch.Tensor:
    """f(w0) + J·δ by torch.func.jvp over the *whole* network from pixels (no trunk split, no tricks)."""
    w0 = dict(model.net.named_parameters())
    tangents = dict(model.linearized_parameters) if tangents is None else tangents

    def f(params):
        return functional_call(model.net, params, (x,))

    with model._activations(check=True), forward_mode_attention():
        out, tangent = jvp(f, ({n: w0[n] for n in tangents},), (tangents,))
    return out + tangent


@pytest.mark.parametrize("activation", ["tangent", "leaky", "none"])
def test_zero_delta_is_base_forward_exactly(family, activation):
    model, x = build(family, activation=activation, linearize="all")
    with torch.no_grad():
        for delta in model.delta.values():
            delta.zero_()
    assert torch.equal(model(x), model.base_forward(x))


@pytest.mark.parametrize("family", RELU_FAMILIES + ["timm-vit", "hf-vit"])
def test_tangent_mode_keeps_pretrained_output_exactly(family):
    network, size = pretrained_network(family)
    network = network.double().eval()
    original = original_copy(network)
    config = LQFConfig(activation="tangent", head_init="pretrained", linearize="all")
    if family.startswith("timm"):
        model = LQFModel.from_timm(network, config=config)
    else:
        model = LQFModel.from_transformers(network, config=config)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad(), forward_mode_attention():  # the same attention kernel on both sides
        expected = original(x) if family.startswith("timm") else original(pixel_values=x).logits
    assert torch.equal(model.base_forward(x), expected)


@pytest.mark.parametrize("activation", ["leaky", "none"])
def test_linear_term_matches_central_difference(family, activation):
    if activation == "none" and family in RELU_FAMILIES:
        pytest.skip("plain ReLU with max-pool ties has no derivative at exact zeros (DESIGN.md §6)")
    model, x = build(family, activation=activation, linearize="all")
    linear_term = model(x) - model.base_forward(x)
    eps = 1e-6  # small enough that no leaky-ReLU kink or max-pool argmax is crossed (float64)
    deltas = {k: d.detach().clone() for k, d in model.delta.items()}
    with torch.no_grad():
        for k, d in model.delta.items():
            d.copy_(eps * deltas[k])
        plus = model.nonlinear_forward(x)
        for k, d in model.delta.items():
            d.copy_(-eps * deltas[k])
        minus = model.nonlinear_forward(x)
    central = (plus - minus) / (2 * eps)
    rel = (linear_term - central).norm() / central.norm()
    assert rel < 1e-6, rel


@pytest.mark.parametrize("linearize", ["last:1", "head", "all"])
def test_output_is_linear_in_delta(family, linearize):
    model, x = build(family, linearize=linearize)
    base = model.base_forward(x)
    first = model(x) - base
    with torch.no_grad():
        for d in model.delta.values():
            d.mul_(-2.5)
    assert torch.allclose(model(x) - base, -2.5 * first, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["tangent", "leaky"])
@pytest.mark.parametrize("linearize", ["last:2", "all"])
def test_value_and_gradient_match_naive_jvp(family, activation, linearize):
    if family == "timm-mobilenetv3":
        pytest.skip("the naive reference needs the derivative of hardsigmoid_backward, which torch lacks")
    model, x = build(family, activation=activation, linearize=linearize)
    weights = torch.randn(x.shape[0], 5, dtype=x.dtype)
    ours = model(x)
    reference = reference_linearized(model, x)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    params = list(model.delta.values())
    grads = torch.autograd.grad((ours * weights).sum(), params)
    expected = torch.autograd.grad((reference * weights).sum(), params)
    for name, g, e in zip(model.delta, grads, expected):
        assert (g - e).norm() <= 1e-8 * e.norm() + 1e-14, name


@pytest.mark.parametrize("activation", ["tangent", "leaky"])
def test_gradient_is_the_adjoint_of_the_jvp(family, activation):
    """<Jᵀw, v> = <w, J v>: reverse-mode gradient against an independent forward-mode product."""
    model, x = build(family, activation=activation, linearize="all")
    weights = torch.randn(x.shape[0], 5, dtype=x.dtype)
    grads = torch.autograd.grad((model(x) * weights).sum(), list(model.delta.values()))
    directions = {n: torch.randn_like(p) for n, p in model.linearized_parameters.items()}
    j_v = reference_linearized(model, x, directions) - model.base_forward(x)
    lhs = sum((g * v).sum() for g, v in zip(grads, directions.values()))
    torch.testing.assert_close(lhs, (weights * j_v).sum(), rtol=1e-10, atol=1e-12)


def test_cached_trunk_gives_the_same_logits(family):
    model, x = build(family, linearize="last:1")
    z = model.encode_trunk(x)
    assert torch.equal(model(trunk_output=z), model(x))
    assert torch.equal(model.base_forward(trunk_output=z), model.base_forward(x))


def test_only_delta_is_trainable_and_network_stays_in_eval():
    model, x = build("timm-resnet", linearize="last:1")
    model.train()
    assert not any(m.training for m in model.net.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"delta.{k}" for k in model.delta}
    assert all(n.startswith("backbone.layer4") or n.startswith("head.") for n in model.linearized_parameters)


def test_last_n_and_prefix_selection():
    model, _ = build("timm-efficientnet", linearize="last:1")
    names = list(model.linearized_parameters)
    assert names[0].startswith("backbone.blocks.4.0.") and "backbone.conv_head.weight" in names
    assert names[-2:] == ["head.weight", "head.bias"]
    model, _ = build("timm-efficientnet", linearize=["conv_head", "bn2"])
    assert list(model.linearized_parameters) == [
        "backbone.conv_head.weight", "backbone.bn2.weight", "backbone.bn2.bias", "head.weight", "head.bias"
    ]
    head_only, x = build("timm-efficientnet", linearize="head")
    assert list(head_only.linearized_parameters) == ["head.weight", "head.bias"]
    assert head_only.encode_trunk(x).shape == (3, head_only.net.head.in_features)  # trunk = whole backbone


def test_head_only_is_a_linear_probe():
    model, x = build("timm-convnext", linearize="head")
    features = model.encode_trunk(x)
    head, d = model.net.head, model.linearized_parameters
    expected = features @ (head.weight + d["head.weight"]).T + head.bias + d["head.bias"]
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["timm-resnet", "timm-vit", "timm-convnext", "hf-vit", "hf-resnet"])
def test_bfloat16_weights(family):
    model32, x = build(family, dtype=torch.float32, linearize="last:1")
    model16, _ = build(family, dtype=torch.float32, linearize="last:1")
    model16 = model16.to(torch.bfloat16)
    out = model16(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model16.delta.values())
    reference = model32(x)
    assert (out.float() - reference).norm() < 0.05 * reference.norm()


@pytest.mark.parametrize("family", ["timm-resnet", "timm-efficientnet", "timm-vit", "hf-convnext"])
def test_autocast_bfloat16(family):
    model, x = build(family, dtype=torch.float32, linearize="all")
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.delta.values())
    assert (out.float() - reference).norm() < 0.05 * reference.norm()


def test_deep_copy_is_refused_with_the_way_to_copy():
    import copy

    model, _ = build("timm-efficientnet")
    with pytest.raises(TypeError, match="save_pretrained"):
        copy.deepcopy(model)
