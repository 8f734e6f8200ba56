"""The certified solver: closed forms from brute-force Jacobians, the certificate's bound, every λ at once."""

import pytest
import torch
from test_train import NUM_CLASSES, toy_images, toy_model
from torch.func import jacrev

from lqf_hub.solver.kfac import KFAC
from lqf_hub.solver.solve import DataTerm, Flat, HeadPath, KrylovPath, PriorMetric, certify, solve

pytestmark = pytest.mark.usefixtures("float64")  # every tensor of these tests is float64


def problem(n: int = 24):
    model = toy_model()
    data = toy_images(n, seed=1)
    z = model.encode_trunk(torch.stack([d["pixel_values"] for d in data]).double())
    labels = torch.tensor([d["label"] for d in data])
    return model, z, labels


def _keys(n: int) -> torch.Tensor:
    """Distinct stand-ins for content digests: ``[n, 32]`` uint8."""
    return torch.arange(n, dtype=torch.int64)[:, None].repeat(1, 4).view(torch.uint8)


def brute_force(model, z, labels):
    """J [N·C, P], residual αY − F0 [N·C], by jacrev over the whole network tail."""
    jac = jacrev(model.tail_function(z))(dict(model.linearization_point))
    n = len(labels)
    j = torch.cat([jac[name].reshape(n * NUM_CLASSES, -1) for name in model.linearized_parameters], dim=1)
    targets = model.config.target_scale * torch.nn.functional.one_hot(labels, NUM_CLASSES)
    return j, (targets - model.base_forward(trunk_output=z)).flatten()


def metric_of(prior: str, model, z, flat) -> PriorMetric:
    if prior == "isotropic":
        return PriorMetric(flat)
    if prior == "head":
        return PriorMetric(flat, head_only=True)
    kfac = KFAC(model.linearization_point, model.linearized_parameters, ridge=0.0, damping=0.3)
    for batch in z.split(8):
        kfac.accumulate(model.tail_function(batch), batch.shape[0])
    kfac.finalize()
    return PriorMetric(flat, kfac)


def setup(prior: str, batch_size: int):
    """Brute-force J and αY − F0, the solver's data term and the prior's metric on 24 toy images."""
    model, z, labels = problem()
    j, residual = brute_force(model, z, labels)
    data = DataTerm(model, z, labels, _keys(len(labels)), batch_size=batch_size)
    return j, residual, data, metric_of(prior, model, z, data.flat)


def closed_form(j, residual, ridge, metric) -> torch.Tensor:
    """(JᵀJ + NλM)⁻¹Jᵀ(αY − F0), in its dual form M⁻¹Jᵀ(JM⁻¹Jᵀ + NλI)⁻¹(αY − F0) (P is large, N·C small);
    for the head-only prior M⁻¹ is the projection onto the head, and this is the head's ridge regression."""
    n = j.shape[0] // NUM_CLASSES
    m_inverse_jt = torch.stack([metric.power(row, 1.0) for row in j], dim=1)  # [P, N·C]
    return m_inverse_jt @ torch.linalg.solve(j @ m_inverse_jt + n * ridge * torch.eye(j.shape[0]), residual)


def objective(j, residual, ridge, metric, delta) -> float:
    n = j.shape[0] // NUM_CLASSES
    return float(0.5 * (j @ delta - residual).square().sum() / n + 0.5 * ridge * delta @ metric.power(delta, -1.0))


@pytest.mark.parametrize("prior", ["isotropic", "kfac"])
def test_solution_is_the_closed_form_to_1e_8(prior):
    j, residual, data, metric = setup(prior, batch_size=8)
    ridge = 0.05
    expected = closed_form(j, residual, ridge, metric)
    delta, certificate = solve(data, metric, ridge, tolerance=1e-11)
    assert (delta - expected).norm() / expected.norm() < 1e-8
    assert certificate.relative_gradient_norm <= 1e-11 and certificate.prior == prior
    assert certificate.objective == pytest.approx(objective(j, residual, ridge, metric, expected), rel=1e-10)


def test_another_preconditioner_reaches_the_same_certified_optimum():
    """The exact ``(G + λM)⁻¹`` as preconditioner: one CG step from the fresh residual, then the certificate (in M⁻¹'s
    norm, whatever preconditions) from a fresh product. ``2M⁻¹`` takes M's own CG steps (CG does not see a scale)."""
    j, residual, data, metric = setup("kfac", batch_size=8)
    ridge = 0.05
    expected = closed_form(j, residual, ridge, metric)
    n = j.shape[0] // NUM_CLASSES
    m_inverse_jt = torch.stack([metric.power(row, 1.0) for row in j], dim=1)  # [P, N·C]
    dual = torch.linalg.inv(j @ m_inverse_jt + n * ridge * torch.eye(j.shape[0], dtype=j.dtype))

    def exact(r: torch.Tensor) -> torch.Tensor:  # Woodbury: (JᵀJ/N + λM)⁻¹ = (M⁻¹ − M⁻¹Jᵀ(JM⁻¹Jᵀ + NλI)⁻¹JM⁻¹) / λ
        return (metric.power(r, 1.0) - m_inverse_jt @ (dual @ (m_inverse_jt.T @ r))) / ridge

    reached = {}
    for name, preconditioner in (("exact", exact), ("2M⁻¹", lambda r: 2 * metric.power(r, 1.0)), ("M⁻¹", None)):
        gradients = []
        delta, certificate = solve(data, metric, ridge, tolerance=1e-10, preconditioner=preconditioner,
                                   callback=gradients.append)
        assert (delta - expected).norm() / expected.norm() < 1e-7 and certificate.relative_gradient_norm <= 1e-10
        assert len(gradients) == certificate.iterations and gradients[0] == pytest.approx(1.0)
        assert gradients[-1] == pytest.approx(certificate.relative_gradient_norm, rel=1e-6)
        reached[name] = certificate.iterations
    assert reached["exact"] == 3 < reached["M⁻¹"]  # a fresh residual, one step, the certificate's product
    assert abs(reached["2M⁻¹"] - reached["M⁻¹"]) <= 0.1 * reached["M⁻¹"]  # the same steps but for rounding at 1e-10


@pytest.mark.parametrize("prior", ["isotropic", "kfac"])
def test_each_step_reaches_the_least_gradient_of_its_krylov_space(prior):
    """The reported gradients are those of the smoothed iterates: after k products, the least ``‖∇L‖_{M⁻¹}`` over
    ``span{z, (M⁻¹H)z, …, (M⁻¹H)^(k−1)z}`` with ``z = M⁻¹b`` (the MINRES iterate; least squares on the brute-force
    Jacobian here), so they never rise."""
    j, residual, data, metric = setup(prior, batch_size=8)
    ridge, n = 0.05, j.shape[0] // NUM_CLASSES

    def hessian(v: torch.Tensor) -> torch.Tensor:
        return j.T @ (j @ v) / n + ridge * metric.power(v, -1.0)

    rhs = j.T @ residual / n
    basis, vector = [], metric.power(rhs, 1.0)
    for _ in range(6):
        basis.append(vector / vector.norm())
        vector = metric.power(hessian(basis[-1]), 1.0)
        columns = torch.stack(basis, 1)
        vector = vector - columns @ (columns.T @ vector)  # orthonormal columns, for a well-posed least squares
    gradients = []
    with pytest.raises(RuntimeError, match="No certificate after 8 products"):  # a fresh one, 6 steps, a fresh one
        solve(data, metric, ridge, tolerance=1e-30, max_iterations=7, callback=gradients.append)
    rhs_norm = float(rhs @ metric.power(rhs, 1.0)) ** 0.5
    for k in range(1, 7):
        images = torch.stack([hessian(b) for b in basis[:k]], 1)  # H·K [P, k]
        dual_images = torch.stack([metric.power(c, 1.0) for c in images.T], 1)  # M⁻¹·H·K
        least = torch.linalg.solve(images.T @ dual_images, dual_images.T @ rhs)  # normal equations in M⁻¹'s norm
        gap = rhs - images @ least
        assert gradients[k] == pytest.approx(float(gap @ metric.power(gap, 1.0)) ** 0.5 / rhs_norm, rel=1e-6)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(gradients[:7], gradients[1:7]))


@pytest.mark.parametrize("prior", ["isotropic", "kfac"])
def test_the_certificate_bounds_the_true_suboptimality(prior):
    j, residual, data, metric = setup(prior, batch_size=24)
    ridge = 0.02
    optimum = objective(j, residual, ridge, metric, closed_form(j, residual, ridge, metric))
    for tolerance in (0.3, 0.1, 1e-2, 1e-3):
        delta, certificate = solve(data, metric, ridge, tolerance=tolerance)
        gap = objective(j, residual, ridge, metric, delta) - optimum
        assert -1e-9 <= gap <= certificate.suboptimality_bound * (1 + 1e-9), (tolerance, gap, certificate)
        assert certificate.relative_gradient_norm <= tolerance


def test_one_lanczos_run_serves_every_ridge():
    model, z, labels = problem(12)  # G has rank ≤ 36: Lanczos ends on an invariant subspace
    j, residual = brute_force(model, z, labels)
    data = DataTerm(model, z, labels, _keys(len(labels)), batch_size=12)
    metric = metric_of("kfac", model, z, data.flat)
    path = KrylovPath(data, metric, [1e-4], tolerance=1e-12, max_iterations=60)
    assert path.iterations <= 37
    for ridge in (1.0, 0.1, 1e-2, 1e-3):
        expected = closed_form(j, residual, ridge, metric)
        got = path.solution(ridge)
        assert (got - expected).norm() / expected.norm() < 1e-7, ridge
        certificate, _ = certify(data, metric, ridge, got)
        assert certificate.relative_gradient_norm < 1e-7
        assert path.residual(ridge) < 1e-7


def test_scores_match_the_model():
    model, z, labels = problem(9)
    data = DataTerm(model, z, labels, _keys(len(labels)), batch_size=4)
    delta = torch.randn(len(data.flat.zeros()), generator=torch.Generator().manual_seed(0)) * 1e-2
    with torch.no_grad():
        for name, part in data.flat.unflatten(delta).items():
            model.linearized_parameters[name].copy_(part)
    logits = model(trunk_output=z).detach()
    targets = model.config.target_scale * torch.nn.functional.one_hot(labels, NUM_CLASSES)
    losses, correct = data.sample_scores(delta)
    assert torch.equal(correct, logits.argmax(-1) == labels)
    torch.testing.assert_close(losses, 0.5 * (logits - targets).square().sum(-1), rtol=1e-12, atol=0)


def test_flat_round_trip():
    model = toy_model()
    flat = Flat(model.linearization_point)
    tensors = {n: torch.randn(t.shape) for n, t in model.linearization_point.items()}
    assert all(torch.equal(tensors[n], t) for n, t in flat.unflatten(flat.flatten(tensors)).items())


def test_sampled_prior_depends_on_the_set_of_images_only():
    """Output vectors drawn from each image's key: another order and another batching give the same factors
    (with a shared random stream they would not)."""
    model, z, labels = problem()
    keys = _keys(len(labels))

    def factors(order, batch_size):
        kfac = KFAC(model.linearization_point, model.linearized_parameters, ridge=0.0, damping=0.3, outputs="sampled")
        for rows in order.split(batch_size):
            kfac.accumulate(model.tail_function(z[rows]), len(rows), keys[rows])
        kfac.finalize()
        rebuilt = {f"diag/{n}": d for n, d in kfac.diag_eig.items()}
        for name, block in kfac.blocks.items():
            for side in ("a", "b"):
                basis = block.eig[f"basis_{side}"]
                rebuilt[f"{name}/{side}"] = basis @ torch.diag_embed(block.eig[f"eig_{side}"]) @ basis.transpose(-1, -2)
        return rebuilt

    reference = factors(torch.arange(len(labels)), 8)
    shuffled = factors(torch.randperm(len(labels), generator=torch.Generator().manual_seed(3)), 5)
    assert reference.keys() == shuffled.keys()
    for name, value in reference.items():
        torch.testing.assert_close(shuffled[name], value, rtol=1e-9, atol=1e-12)


def test_head_path_is_lqf_head_in_closed_form_at_every_ridge():
    """LQF-head (the backbone's δ held at zero) from the features' eigendecomposition equals the brute-force
    ridge on the head's columns of J, for every λ, without a product with the data."""
    j, residual, data, metric = setup("head", batch_size=7)
    path = HeadPath(data)
    head = metric.mask.bool()
    assert path.iterations == 0 and 0 < int(head.sum()) < len(head)
    for ridge in (10.0, 0.1, 1e-3):
        delta = path.solution(ridge)
        expected = closed_form(j, residual, ridge, metric)
        assert torch.equal(delta[~head], torch.zeros_like(delta[~head])) and torch.equal(expected[~head], delta[~head])
        assert (delta - expected).norm() / expected.norm() < 1e-9


def test_the_head_prior_is_solved_and_certified_on_the_head_alone():
    j, residual, data, metric = setup("head", batch_size=8)
    ridge = 0.05
    delta, certificate = solve(data, metric, ridge, tolerance=1e-10)
    expected = HeadPath(data).solution(ridge)
    assert (delta - expected).norm() / expected.norm() < 1e-8 and certificate.prior == "head"
    assert bool((delta[~metric.mask.bool()] == 0).all())
    warm, again = solve(data, metric, ridge, tolerance=1e-10, start=expected)
    assert again.iterations == 1  # the closed form needs only the certificate's product
    assert again.objective == pytest.approx(objective(j, residual, ridge, metric, expected), rel=1e-10)
