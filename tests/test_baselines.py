"""The baselines LQF is compared with: the linear probe against scikit-learn, its Laplace posterior (laplace-torch)
against a brute-force one, fine-tuning on a toy task."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from lqf_hub.compare.baselines import accuracy, fine_tune, laplace_predictive, linear_probe, probe_scores


def test_linear_probe_matches_scikit_learn_logistic_regression():
    """Same objective as LogisticRegression(C=1) on standardised features: same probabilities."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 2.0
    y = torch.randint(0, 3, (60,), generator=generator)
    head = linear_probe(x, y, 3)
    standardised = ((x - x.mean(0)) / x.std(0)).double().numpy()
    reference = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(standardised, y.numpy())
    with torch.no_grad():
        ours = head(x).softmax(-1).double().numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(standardised), atol=1e-6)


def _brute_force_laplace(head: nn.Linear, x: torch.Tensor, y: torch.Tensor):
    """The Laplace posterior of a linear softmax classifier built by hand: its GGN ``Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i``
    over (weight row-major, bias), ``J_i = [I ⊗ x_iᵀ, I]``; returns (Jacobian of x*, GGN, θ) in float64."""
    weight, bias = head.weight.detach().double(), head.bias.detach().double()
    classes = weight.shape[0]

    def jacobian(features: torch.Tensor) -> torch.Tensor:  # [n, K, K·D + K]
        eye = torch.eye(classes, dtype=torch.float64)
        return torch.cat([torch.einsum("kl,nd->nkld", eye, features.double()).flatten(2),
                          eye.expand(len(features), classes, classes)], dim=-1)

    p = (x.double() @ weight.T + bias).softmax(-1)
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    j = jacobian(x)
    ggn = torch.einsum("nka,nkl,nlb->ab", j, curvature, j)
    return jacobian, ggn, torch.cat([weight.flatten(), bias])


def test_laplace_predictive_matches_a_brute_force_laplace_posterior():
    """laplace-torch's full-GGN posterior of the probe (on standardised features) at a fixed prior precision gives the
    probit predictive
    ``softmax(μ / √(1 + π/8·diag Σ))`` with ``Σ = J(GGN + τI)⁻¹Jᵀ``; the marginal-likelihood τ maximises the
    hand-built Laplace evidence ``−½ log det(GGN + τI) + ½P log τ − ½τ‖θ‖²`` (+ terms without τ)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator)
    y = (x @ torch.randn(3, 3, generator=generator)).argmax(-1)
    test = torch.randn(7, 3, generator=generator)
    head = linear_probe(x, y, 3, weight_decay=1e-2)
    centre, spread = x.double().mean(0), x.double().std(0)  # the posterior lives on standardised features, as the probe
    standardised = nn.Linear(3, 3, dtype=torch.float64)
    with torch.no_grad():
        standardised.weight.copy_(head.weight.double() * spread)
        standardised.bias.copy_(head.bias.double() + head.weight.double() @ centre)
    jacobian, ggn, theta = _brute_force_laplace(standardised, (x - centre) / spread, y)
    for tau in (0.5, 4.0):
        ours, precision = laplace_predictive(head, x, y, test, hessian_structure="full", prior_precision=tau)
        scaled = (test - centre) / spread
        covariance = jacobian(scaled) @ torch.linalg.solve(ggn + tau * torch.eye(len(theta), dtype=torch.float64),
                                                           jacobian(scaled).transpose(1, 2))
        with torch.no_grad():
            mean = head(test).double()
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * covariance.diagonal(dim1=1, dim2=2))
        torch.testing.assert_close(ours.double(), (kappa * mean).softmax(-1), rtol=1e-6, atol=1e-9)
        assert precision == tau

    def evidence(tau: float) -> float:
        return float(-0.5 * torch.logdet(ggn + tau * torch.eye(len(theta), dtype=torch.float64))
                     + 0.5 * len(theta) * math.log(tau) - 0.5 * tau * theta.square().sum())

    _, chosen = laplace_predictive(head, x, y, test, hessian_structure="full")
    assert evidence(chosen) >= max(evidence(chosen * 1.5), evidence(chosen / 1.5))


def test_probe_scores_count_correct_test_predictions_and_score_its_softmax():
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[-3.0], [3.0], [0.5]]), torch.tensor([0, 1, 0])
    scores = probe_scores((x, y), test, 2)
    assert scores["accuracy"] == 2 / 3
    with torch.no_grad():
        probabilities = linear_probe(x, y, 2)(test[0]).double().softmax(-1)
    assert scores["nll"] == pytest.approx(float(-probabilities[[0, 1, 2], test[1]].log().mean()))


def test_fine_tune_fits_a_separable_task_and_leaves_the_network_untouched():
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(40) % 2
    pixels = torch.randn(40, 3, 4, 4, generator=generator) * 0.3 + (labels * 2.0 - 1.0).reshape(-1, 1, 1, 1)
    data = [{"pixel_values": p, "label": int(t)} for p, t in zip(pixels, labels)]
    network = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU())
    before = {k: v.clone() for k, v in network.state_dict().items()}
    model = fine_tune(network, 8, 2, data, epochs=20, batch_size=8, learning_rate=0.05, progress=False)
    assert accuracy(model, data) == 1.0
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert not torch.equal(model[0][1].weight, network[1].weight)  # the copy's body was trained too
