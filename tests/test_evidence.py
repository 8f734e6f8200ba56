"""The evidence against the Gaussian marginal likelihood of the targets, computed from brute-force Jacobians."""

import math

import numpy as np
import pytest
import torch
from test_solve import NUM_CLASSES, _keys, brute_force, metric_of, problem

from lqf_hub.solver.evidence import evidence_path, log_evidence
from lqf_hub.solver.solve import DataTerm, KrylovPath

pytestmark = pytest.mark.usefixtures("float64")
RIDGES = [10.0, 1.0, 0.1]


def setup(prior: str):
    model, z, labels = problem()
    j, residual = brute_force(model, z, labels)
    data = DataTerm(model, z, labels, _keys(len(labels)), batch_size=8)
    return j, residual, data, metric_of(prior, model, z, data.flat)


def whitened_jacobian(j, metric):
    """``W = J M^-½`` ``[N·C, P]`` (rows ``M^-½ J_rᵀ``): ``A = WᵀW/N`` and ``J M⁻¹ Jᵀ = W Wᵀ``."""
    return torch.stack([metric.power(row, 0.5) for row in j])


def marginal_likelihood(residual, kernel, ridge, noise, n) -> float:
    """``log N(αY − F0; 0, σ²(I + J M⁻¹ Jᵀ/(Nλ)))`` over the N·C targets: the definition, with no algebra."""
    covariance = noise * (torch.eye(len(residual)) + kernel / (n * ridge))
    return float(torch.distributions.MultivariateNormal(torch.zeros(len(residual)), covariance).log_prob(residual))


@pytest.mark.parametrize("prior", ["isotropic", "kfac", "head"])
def test_the_evidence_is_the_marginal_likelihood_of_the_targets(prior):
    j, residual, data, metric = setup(prior)
    n = data.count
    path = evidence_path(data, metric, RIDGES, probes=4, seed=0, tolerance=1e-10, max_iterations=400)
    w = whitened_jacobian(j, metric)
    kernel = w @ w.T  # J M⁻¹ Jᵀ
    singular = torch.linalg.eigvalsh(kernel / n).clamp_min(0)  # the nonzero μ of M⁻¹G
    for ridge, per_image, fit, logdet, error, noise in zip(path.ridges, path.log_evidence, path.fit,
                                                           path.log_determinant, path.log_determinant_error,
                                                           path.noise_variance):
        exact_logdet = float(torch.log1p(singular / ridge).sum())
        if prior == "head":
            assert logdet == pytest.approx(exact_logdet, rel=1e-8) and error == 0.0
        else:  # Hutchinson over 4 probes: unbiased, within 4 of its standard errors
            assert abs(logdet - exact_logdet) <= 4 * error + 1e-9
        assert noise == pytest.approx(2 * fit / NUM_CLASSES, rel=1e-12)
        # the fit term: the objective's optimum, closed form in the dual
        dual = torch.linalg.solve(kernel + n * ridge * torch.eye(len(residual)), residual)
        exact_fit = 0.5 * ridge * float(residual @ dual)  # L_λ = ½λ·rᵀ(K + NλI)⁻¹r
        assert fit == pytest.approx(exact_fit, rel=1e-8)
        # the whole: the Gaussian density of the targets at the maximising σ², with the exact log-determinant
        direct = marginal_likelihood(residual, kernel, ridge, noise, n) / n
        assert log_evidence(fit, exact_logdet, n, NUM_CLASSES) == pytest.approx(direct, rel=1e-9)
        assert per_image == pytest.approx(direct, abs=4 * error / n + 1e-9)


def test_the_maximising_noise_maximises_the_marginal_likelihood():
    j, residual, data, metric = setup("isotropic")
    path = evidence_path(data, metric, [1.0], probes=1, tolerance=1e-10, max_iterations=400)
    w = whitened_jacobian(j, metric)
    best = path.noise_variance[0]
    at = [marginal_likelihood(residual, w @ w.T, 1.0, best * factor, data.count) for factor in (0.9, 1.0, 1.1)]
    assert at[1] > at[0] and at[1] > at[2]


@pytest.mark.parametrize("prior", ["isotropic", "kfac"])
def test_lanczos_quadrature_from_a_probe_is_exact_once_the_krylov_space_is_whole(prior):
    j, _, data, metric = setup(prior)
    n = data.count
    z = (torch.randint(0, 2, (sum(data.flat.sizes),), generator=torch.Generator().manual_seed(3)) * 2 - 1).double()
    lanczos = KrylovPath(data, metric, RIDGES, tolerance=1e-12, max_iterations=400, start=z)
    w = whitened_jacobian(j, metric)
    values, vectors = torch.linalg.eigh(w @ w.T / n)  # A = WᵀW/N: its nonzero eigenpairs from the dual
    keep = values > 1e-10 * values.max()
    right = (w.T @ vectors[:, keep]) / torch.sqrt(n * values[keep])  # A's eigenvectors [P, r]
    along = (right.T @ z).square()
    for ridge in RIDGES:
        exact = float((torch.log1p(values[keep] / ridge) * along).sum())  # zᵀ log(I + A/λ) z
        assert lanczos.quadrature(lambda theta, r=ridge: np.log1p(theta / r)) == pytest.approx(exact, rel=1e-8)


def test_the_evidence_path_reports_its_choice_and_refuses_no_probes():
    _, _, data, metric = setup("head")
    path = evidence_path(data, metric, [0.01, 100.0, 1.0], tolerance=1e-6, max_iterations=50)
    assert path.ridges == [100.0, 1.0, 0.01] and path.products == 0
    assert path.best == path.ridges[int(np.argmax(path.log_evidence))]
    assert all(math.isfinite(v) for v in path.log_evidence)
    with pytest.raises(ValueError, match="`probes` must be >= 1"):
        evidence_path(data, metric, [1.0], probes=0, tolerance=1e-6, max_iterations=50)
