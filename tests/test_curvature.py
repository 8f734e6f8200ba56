"""Exact curvature: H·v against a brute-force Jacobian in float64, and Lanczos."""

import math

import pytest
import torch
from conftest import pretrained_network
from torch.func import jacrev

from lqf_hub import LQFConfig, LQFModel
from lqf_hub.errors import CurvatureError
from lqf_hub.solver.curvature import hessian_vector_product, largest_eigenvalue

NUM_CLASSES = 3


def _model() -> tuple[LQFModel, torch.Tensor]:
    """A float64 model whose tail (1x1 conv, BatchNorm, head) is linearized, and trunk outputs [4, ...]."""
    network, _ = pretrained_network("timm-efficientnet")
    config = LQFConfig(linearize=["conv_head", "bn2"], ridge=0.1)
    model = LQFModel.from_timm(network, NUM_CLASSES, config).to(torch.float64)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, model.encode_trunk(x)


def test_hessian_vector_product_is_exact_in_float64():
    """``(JᵀJ/N + λI)·v`` from the brute-force Jacobian [N·C, P], to float64 precision."""
    model, z = _model()
    names = list(model.linearized_parameters)
    jac = jacrev(model.tail_function(z))(dict(model.linearization_point))  # name -> [N, C, *shape]
    j = torch.cat([jac[n].reshape(z.shape[0] * NUM_CLASSES, -1) for n in names], dim=1).detach()
    generator = torch.Generator().manual_seed(2)
    vector = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in
              model.linearized_parameters.items()}
    flat = torch.cat([vector[n].flatten() for n in names])
    expected = j.T @ (j @ flat) / z.shape[0] + model.config.ridge * flat
    product = hessian_vector_product(model, list(z.split(2)), vector)
    got = torch.cat([product[n].flatten() for n in names])
    assert got.dtype == torch.float64
    assert float((got - expected).norm() / expected.norm()) < 1e-12


def test_largest_eigenvalue_of_a_known_operator():
    scales = {"a": torch.linspace(0.1, 3.0, 7, dtype=torch.float64), "b": torch.tensor([[0.5, 4.0]], dtype=torch.float64)}
    largest = largest_eigenvalue(lambda v: {n: scales[n] * t for n, t in v.items()}, scales, iterations=9)
    assert largest == pytest.approx(4.0, rel=1e-10)


def test_lanczos_refuses_a_non_finite_product():
    like = {"w": torch.zeros(5, dtype=torch.float64)}

    def operator(v):
        return {"w": v["w"] * torch.tensor([1.0, 2.0, math.nan, 1.0, 1.0], dtype=torch.float64)}

    with pytest.raises(CurvatureError, match=r"Hessian-vector product is not finite \(in w\).*Check the inputs"):
        largest_eigenvalue(operator, like)
