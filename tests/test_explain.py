"""Attribution and forgetting: the representer split against brute-force kernels, forgetting against retraining."""

import dataclasses
import warnings

import pytest
import torch
from test_solve import _keys, brute_force, closed_form, metric_of, problem
from test_train import NUM_CLASSES, deltas, toy_images, toy_model
from torch.func import jacrev

from lqf_hub import LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.analysis.explain import Explainer
from lqf_hub.analysis.forget import forget
from lqf_hub.solver.kfac import KFAC
from lqf_hub.solver.solve import DataTerm, certify, solve


def solved(prior: str, ridge: float, tolerance: float):
    """A float64 toy model at (or near) its optimum on 12 images, with its data term and metric."""
    model, z, labels = problem(12)
    data = DataTerm(model, z, labels, _keys(len(labels)), batch_size=5)
    metric = metric_of(prior, model, z, data.flat)
    delta, _ = solve(data, metric, ridge, tolerance=tolerance)
    with torch.no_grad():
        for name, part in data.flat.unflatten(delta).items():
            model.linearized_parameters[name].copy_(part)
    return model, z, labels, data, metric, delta


@pytest.mark.usefixtures("float64")
def test_contributions_are_the_brute_force_kernel_times_the_residuals():
    ridge = 0.05
    model, z, labels, data, metric, delta = solved("kfac", ridge, 1e-12)
    x = model.encode_trunk(torch.stack([d["pixel_values"] for d in toy_images(2, seed=9)]).double())[:1]
    explanation = Explainer(model, data, metric, ridge).explain(x)
    j, residual0 = brute_force(model, z, labels)  # J [N·C, P], αY − F0 [N·C]
    residuals = (residual0 - j @ delta).reshape(-1, NUM_CLASSES)  # r_i = αy_i − f_lin(x_i)
    jac = jacrev(model.tail_function(x))(dict(model.linearization_point))
    jx = torch.cat([jac[n].reshape(NUM_CLASSES, -1) for n in model.linearized_parameters], dim=1)  # [C, P]
    m_inverse_jt = torch.stack([metric.power(row, 1.0) for row in j], dim=1)  # [P, N·C]
    kernel = (jx @ m_inverse_jt).reshape(NUM_CLASSES, len(labels), NUM_CLASSES)  # [c, i, k]
    expected = torch.einsum("cik,ik->ic", kernel, residuals) / (len(labels) * ridge)
    torch.testing.assert_close(explanation.contributions, expected, rtol=1e-8, atol=1e-10)
    change = explanation.output - explanation.base
    assert explanation.gap.abs().max() <= 1e-8 * change.abs().max()  # at the optimum the split is exact
    indices, values = explanation.ranked(3)
    assert indices.tolist() == expected[:, explanation.predicted].argsort(descending=True)[:3].tolist()
    assert explanation.ranked(3, supporting=False)[1].max() <= values.min()


@pytest.mark.usefixtures("float64")
def test_self_influence_is_each_image_s_own_contribution():
    ridge = 0.05
    model, z, labels, data, metric, delta = solved("kfac", ridge, 1e-12)
    explainer = Explainer(model, data, metric, ridge)
    shares = explainer.self_influence()
    for i in (0, 7):
        torch.testing.assert_close(shares[i], explainer.explain(z[i:i + 1]).contributions[i], rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("prior", ["isotropic", "kfac"])
def test_leave_one_out_is_the_brute_force_re_solve_without_each_image(prior):
    ridge, n = 0.05, 12
    model, z, labels, data, metric, delta = solved(prior, ridge, 1e-12)
    explainer = Explainer(model, data, metric, ridge)
    kernel = explainer.training_kernel()
    j, residual0 = brute_force(model, z, labels)  # J [N·C, P], αY − F0 [N·C]
    m_inverse_jt = torch.stack([metric.power(row, 1.0) for row in j], dim=1)
    torch.testing.assert_close(kernel.reshape(n * NUM_CLASSES, -1), j @ m_inverse_jt, rtol=1e-9, atol=1e-12)
    rows = torch.arange(n).repeat_interleave(NUM_CLASSES)
    loo = explainer.leave_one_out(kernel)
    for i in range(n):  # the others' optimum with the same total penalty Nλ: λ' = Nλ/(N−1) on their mean
        kept = rows != i
        without = closed_form(j[kept], residual0[kept], n * ridge / (n - 1), metric)
        expected = explainer.fitted[i] + explainer.residuals[i] - residual0[~kept] + j[~kept] @ without  # F0 + J δ₋ᵢ
        torch.testing.assert_close(loo[i], expected, rtol=1e-8, atol=1e-10)
    assert (loo - explainer.fitted).abs().max() > 1e-3  # leaving out is not the fitted value


@pytest.mark.usefixtures("float64")
def test_random_features_estimate_the_kernel_and_the_split_without_bias():
    model, z, labels, data, metric, delta = solved("kfac", 0.05, 1e-10)
    explainer = Explainer(model, data, metric, 0.05)
    exact = explainer.training_kernel()
    x = model.encode_trunk(torch.stack([d["pixel_values"] for d in toy_images(2, seed=9)]).double())[:1]
    split = explainer.explain(x).contributions
    kernel_errors, split_errors = [], []
    for k in (16, 256):
        features = explainer.random_features(k, seed=1)
        kernel_errors.append(float((explainer.training_kernel(features) - exact).norm() / exact.norm()))
        split_errors.append(float((explainer.explain(x, features=features).contributions - split).norm() / split.norm()))
    # unbiased, error ~ 1/√k (here ≈ √(2/k): K is nearly rank one): 16 times the projections, a quarter of it
    assert kernel_errors[1] < 0.2 and kernel_errors[1] < kernel_errors[0] / 2
    assert split_errors[1] < 0.25 and split_errors[1] < split_errors[0] / 2
    torch.testing.assert_close(explainer.leave_one_out(features),  # the low-rank route, without forming ΦΦᵀ
                               explainer.leave_one_out(explainer.training_kernel(features)), rtol=1e-9, atol=1e-10)
    again = explainer.random_features(8, seed=1).train
    assert torch.equal(again, explainer.random_features(8, seed=1).train)  # R is the seed's
    assert not torch.equal(again, explainer.random_features(8, seed=2).train)


@pytest.mark.usefixtures("float64")
def test_flipped_labels_have_the_lowest_label_margins():
    model = toy_model()
    images = toy_images(30, seed=5)
    flipped = [4, 17]
    for i in flipped:
        images[i] = {**images[i], "label": (images[i]["label"] + 1) % NUM_CLASSES}
    z = model.encode_trunk(torch.stack([d["pixel_values"] for d in images]))
    labels = torch.tensor([d["label"] for d in images])
    data = DataTerm(model, z, labels, _keys(len(labels)), batch_size=10)
    metric = metric_of("kfac", model, z, data.flat)
    delta, _ = solve(data, metric, 1.0, tolerance=1e-10)
    with torch.no_grad():
        for name, part in data.flat.unflatten(delta).items():
            model.linearized_parameters[name].copy_(part)
    explainer = Explainer(model, data, metric, 1.0)
    margins = explainer.label_margins(explainer.leave_one_out(explainer.training_kernel()))
    assert sorted(margins.argsort()[:2].tolist()) == flipped


@pytest.mark.usefixtures("float64")
def test_removal_effects_are_the_first_order_change_and_predict_leaving_images_out():
    ridge, n = 0.05, 48
    model, z, labels = problem(n)
    data = DataTerm(model, z, labels, _keys(n), batch_size=16)
    metric = metric_of("kfac", model, z, data.flat)
    j, residual0 = brute_force(model, z, labels)
    delta = closed_form(j, residual0, ridge, metric)
    with torch.no_grad():
        for name, part in data.flat.unflatten(delta).items():
            model.linearized_parameters[name].copy_(part)
    x = model.encode_trunk(torch.stack([d["pixel_values"] for d in toy_images(3, seed=9)]).double())
    effects = Explainer(model, data, metric, ridge).removal_effects(x, tolerance=1e-12)
    jac = jacrev(model.tail_function(x))(dict(model.linearization_point))
    jx = torch.cat([jac[name].reshape(3 * NUM_CLASSES, -1) for name in model.linearized_parameters], dim=1)
    residuals = (residual0 - j @ delta).reshape(n, NUM_CLASSES)
    m_inverse_jt = torch.stack([metric.power(row, 1.0) for row in j], dim=1)  # [P, N·C]

    def inverse_hessian(v):  # (JᵀJ/N + λM)⁻¹ v by Woodbury: P is large, N·C small
        m_inverse_v = metric.power(v, 1.0)
        inner = torch.linalg.solve(j @ m_inverse_jt + n * ridge * torch.eye(j.shape[0]), j @ m_inverse_v)
        return (m_inverse_v - m_inverse_jt @ inner) / ridge

    rows = torch.arange(n).repeat_interleave(NUM_CLASSES)
    for i in (0, 5):  # the formula by brute force: J(x) H⁻¹ (λMδ* − J_iᵀ r_i)
        pull = ridge * metric.power(delta, -1.0) - j[rows == i].T @ residuals[i]
        expected = (jx @ inverse_hessian(pull)).reshape(3, NUM_CLASSES)
        torch.testing.assert_close(effects.effects[i], expected, rtol=1e-7, atol=1e-9)
    kernel, cross = j @ m_inverse_jt, jx @ m_inverse_jt  # J M⁻¹ Jᵀ, J(x) M⁻¹ Jᵀ
    predicted, actual = [], []
    for removed in [[i] for i in range(n)] + [[1, 4], [0, 6, 9, 30]]:  # the optimum without them: closed form
        kept = torch.tensor([r not in removed for r in rows.tolist()])
        count = n - len(removed)
        dual = torch.linalg.solve(kernel[kept][:, kept] + count * ridge * torch.eye(int(kept.sum())), residual0[kept])
        actual.append((cross[:, kept] @ dual - jx @ delta).flatten())  # f_lin without them − f_lin, at x
        predicted.append(effects.predicted_change(removed).flatten())
    predicted, actual = torch.cat(predicted), torch.cat(actual)
    assert torch.corrcoef(torch.stack([predicted, actual]))[0, 1] > 0.98  # removing up to 4 of 48 images
    assert (predicted - actual).norm() > 1e-6 * actual.norm()  # first order, not exact: H_S ≠ H


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("prior", ["isotropic", "kfac"])
def test_the_split_misses_exactly_the_gradient_term_away_from_the_optimum(prior):
    ridge = 0.05
    model, z, labels, data, metric, delta = solved(prior, ridge, 3e-2)
    x = model.encode_trunk(torch.stack([d["pixel_values"] for d in toy_images(2, seed=9)]).double())[1:]
    explanation = Explainer(model, data, metric, ridge).explain(x)
    _, gradient = certify(data, metric, ridge, delta)
    jac = jacrev(model.tail_function(x))(dict(model.linearization_point))
    jx = torch.cat([jac[n].reshape(NUM_CLASSES, -1) for n in model.linearized_parameters], dim=1)
    expected = jx @ metric.power(gradient, 1.0) / ridge  # f_lin − f0 − Σ c_i = J(x) M⁻¹ ∇L(δ) / λ
    assert expected.abs().max() > 1e-3  # away from the optimum: a real gap
    torch.testing.assert_close(explanation.gap, expected, rtol=1e-7, atol=1e-9)


def test_forgetting_equals_retraining_without_the_images(tmp_path, monkeypatch):
    images = toy_images(20, seed=3)
    args = dict(method="solve", ridge_grid=[0.05], tolerance=1e-9, progress=False)
    model = toy_model()
    LQFTrainer(model, images, None, LQFTrainingArguments(output_dir=str(tmp_path / "full"), prior="kfac", **args)).train()
    before = deltas(model).clone()
    model.config.temperature = 2.5  # as if fitted: a fixed λ keeps it
    other = LQFTrainingArguments(output_dir=str(tmp_path / "forgot"), prior="isotropic", **args)  # the model's prior wins
    accumulated, accumulate = [], KFAC.accumulate
    monkeypatch.setattr(KFAC, "accumulate", lambda kfac, call, size, *rest: (accumulated.append(size),
                                                                             accumulate(kfac, call, size, *rest)))
    new, record = forget(model, images, [11, 2, 5, 2], other)
    monkeypatch.undo()
    assert accumulated == [3]  # K-FAC over the kept images is the model's less the removed images' share
    without_posterior = LQFModel.from_pretrained(tmp_path / "full" / "model")
    without_posterior.posterior = None  # as in checkpoints saved before it was stored: K-FAC over the kept images
    recomputed, _ = forget(without_posterior, images, [2, 5, 11], dataclasses.replace(other, output_dir=str(tmp_path / "r")))
    assert (deltas(recomputed) - deltas(new)).norm() <= 1e-7 * deltas(new).norm()  # both certified to 1e-9
    assert torch.equal(deltas(model), before)  # the original is left as it was
    kept = [image for i, image in enumerate(images) if i not in (2, 5, 11)]
    scratch = toy_model()
    scratch_args = LQFTrainingArguments(output_dir=str(tmp_path / "scratch"), prior="kfac", **args)
    from_zero = LQFTrainer(scratch, kept, None, scratch_args).train()[-1]
    assert (deltas(new) - deltas(scratch)).norm() <= 1e-6 * deltas(scratch).norm()
    assert not torch.allclose(deltas(new), before)  # the images mattered
    assert record["iterations"] < from_zero["iterations"]  # the warm start saves products
    saved = LQFModel.from_pretrained(tmp_path / "forgot" / "model")
    assert saved.training_summary["forgotten"]["removed"] == [2, 5, 11]
    assert saved.training_summary["train_samples"] == 17 and saved.training_summary["relative_gradient_norm"] <= 1e-9
    assert saved.training_summary["prior"] == record["prior"] == "kfac" and saved.config.temperature == 2.5
    assert "2, 5, 11" in (tmp_path / "forgot" / "model" / "README.md").read_text()


@pytest.mark.parametrize("remove, message", [([], "empty"), ([20], "outside"), (list(range(20)), "every training image"),
                                             ([3], "does not record the prior")])
def test_forget_refuses_what_it_cannot_do(tmp_path, remove, message):
    model = toy_model()
    model.config.ridge = 0.1
    with pytest.raises(ValueError, match=message):
        forget(model, toy_images(20, seed=3), remove, LQFTrainingArguments(output_dir=str(tmp_path), progress=False))


def test_random_features_round_trip_and_stale_or_corrupt_files_are_not_used(tmp_path):
    from lqf_hub.analysis.explain import RandomFeatures

    features = RandomFeatures(torch.randn(3, 2, 4, dtype=torch.float64), seed=5)
    features.save(tmp_path / "f.safetensors", "digest")
    loaded = RandomFeatures.load(tmp_path / "f.safetensors", "digest")
    assert torch.equal(loaded.train, features.train) and loaded.seed == 5  # bit-exact
    assert RandomFeatures.load(tmp_path / "f.safetensors", "another model") is None
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "f.safetensors").read_bytes()[:40])
    assert RandomFeatures.load(tmp_path / "cut.safetensors", "digest") is None
    assert RandomFeatures.load(tmp_path / "absent.safetensors", "digest") is None


def test_random_features_are_kept_in_the_cache_dir_while_what_they_depend_on_is_unchanged(tmp_path, monkeypatch):
    computed = []
    original = Explainer._projected
    monkeypatch.setattr(Explainer, "_projected", lambda self, *a, **k: computed.append(a[2:4]) or original(self, *a, **k))
    model, z, labels, data, metric, _ = solved("kfac", 0.05, 1e-8)
    explainer = Explainer(model, data, metric, 0.05)
    first = explainer.random_features(6, cache_dir=tmp_path)
    again = Explainer(model, data, metric, 0.5).random_features(6, cache_dir=tmp_path)  # λ does not enter Φ
    assert torch.equal(again.train, first.train) and computed == [(6, 0)]  # read back, bit-exact
    explainer.random_features(6, seed=1, cache_dir=tmp_path)
    Explainer(model, data, metric_of("isotropic", model, z, data.flat), 0.05).random_features(6, cache_dir=tmp_path)
    assert computed == [(6, 0), (6, 1), (6, 0)]  # another seed or prior: computed again


@pytest.mark.usefixtures("float64")
def test_leave_one_out_from_too_few_projections_warns_that_they_are_saturated():
    model, z, labels, data, metric, _ = solved("isotropic", 1e-4, 1e-10)  # nearly interpolating: dof near N·C = 36
    explainer = Explainer(model, data, metric, 1e-4)
    with pytest.warns(UserWarning, match="The 4 random projections are saturated: the model on them has 4 effective"):
        explainer.leave_one_out(explainer.random_features(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 400 projections of a 36-dimensional kernel: tr A <= 36, far from saturated
        explainer.leave_one_out(explainer.random_features(400))


@pytest.mark.usefixtures("float64")
def test_the_predicted_class_alone_is_the_same_column_of_the_full_split():
    model, z, labels, data, metric, _ = solved("kfac", 0.05, 1e-10)
    explainer = Explainer(model, data, metric, 0.05)
    x = model.encode_trunk(torch.stack([d["pixel_values"] for d in toy_images(2, seed=9)]).double())[:1]
    for features in (None, explainer.random_features(8)):
        full = explainer.explain(x, features=features)
        alone = explainer.explain(x, features=features, only_predicted=True)
        c = full.predicted
        torch.testing.assert_close(alone.contributions[:, c], full.contributions[:, c], rtol=1e-12, atol=0)
        assert alone.contributions[:, [k for k in range(NUM_CLASSES) if k != c]].isnan().all()
        assert torch.equal(alone.ranked(3)[0], full.ranked(3)[0]) and torch.equal(alone.gap[c], full.gap[c])
