"""The trainer's solver: the certified optimum, λ chosen by cross-validation over the training images, resume,
the artifact."""

import json
import math

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from test_train import NUM_CLASSES, closed_form, deltas, toy_images, toy_model

import lqf_hub.solver.selection as selection_module
from lqf_hub import CheckpointError, LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.solver.selection import PathPoint, _standard_error, choose, select, stratified_folds
from lqf_hub.solver.solve import DataTerm, Flat, KrylovPath


def solve(model, data, tmp_path, name="run", eval_data=None, **args):
    args = {"method": "solve", "progress": False, "output_dir": str(tmp_path / name), **args}
    trainer = LQFTrainer(model, data, eval_data, LQFTrainingArguments(**args))
    return trainer.train()[-1]


def test_fixed_ridge_reaches_the_closed_form(tmp_path):
    data = toy_images(24, seed=1)
    model = toy_model()
    record = solve(model, data, tmp_path, prior="isotropic", ridge_grid=[0.05], tolerance=1e-11)
    assert model.config.ridge == record["ridge"] == 0.05
    expected = closed_form(model, data)  # with model.config.ridge
    assert (deltas(model) - expected).norm() / expected.norm() < 1e-7  # test_solve.py holds the solver to 1e-8
    assert record["relative_gradient_norm"] <= 1e-11 and record["suboptimality_bound"] >= 0


def test_prior_and_ridge_are_chosen_by_cross_validation_and_reported(tmp_path):
    data, test = toy_images(30, seed=3), toy_images(9, seed=4)
    model = toy_model(torch.float32)
    record = solve(model, data, tmp_path, eval_data=test, ridge_grid=[1.0, 0.1, 0.01, 0.001], dataset_name="toy")
    state = json.loads((tmp_path / "run" / "checkpoints" / "selection" / "trainer_state.json").read_text())
    paths = state["selection"]["paths"]
    assert sorted(paths) == ["head", "isotropic", "kfac"]
    assert all([p["ridge"] for p in path] == [1.0, 0.1, 0.01, 0.001] for path in paths.values())
    assert paths["kfac"] != paths["isotropic"] != paths["head"]  # three objectives, scored on the same folds
    finalists = {kind: path for kind, path in paths.items() if kind not in state["selection"]["dropped"]}
    assert all(p["images"] == 30 for path in finalists.values() for p in path)
    prior = min(finalists, key=lambda kind: min(p["validation_loss"] for p in paths[kind]))  # the rule, by hand
    best = min(paths[prior], key=lambda p: p["validation_loss"])
    chosen = max(p["ridge"] for p in paths[prior] if p["validation_loss"] <= best["validation_loss"] + best["standard_error"])
    assert (record["prior"], record["ridge"]) == (prior, chosen) == (state["selection"]["prior"], state["selection"]["ridge"])
    assert (tmp_path / "run" / "path.png").read_bytes()[:4] == b"\x89PNG"
    assert record["relative_gradient_norm"] <= 1e-4
    saved = LQFModel.from_pretrained(tmp_path / "run" / "model")
    assert saved.config.ridge == record["ridge"] and saved.training_summary["prior"] == prior
    assert saved.training_summary["prior_selection"].startswith("5-fold cross-validation")
    card = ModelCard.load(tmp_path / "run" / "model" / "README.md").text
    assert "suboptimality_bound" in card and "relative_gradient_norm" in card and "prior_selection" in card
    rows = saved.training_summary["selection"]  # every prior's path, in the card too
    picked = [r for r in rows if r["chosen"]]
    assert len(rows) == 12 and [(r["prior"], r["ridge"]) for r in picked] == [(prior, chosen)]
    assert picked[0]["validation_loss"] == next(p["validation_loss"] for p in paths[prior] if p["ridge"] == chosen)
    assert "How the prior and λ were chosen" in card and f"| **{prior}** | **{chosen}** |" in card


def test_a_fixed_prior_runs_one_path_per_fold(tmp_path):
    record = solve(toy_model(torch.float32), toy_images(30, seed=3), tmp_path, prior="isotropic", ridge_grid=[1.0, 0.1])
    state = json.loads((tmp_path / "run" / "checkpoints" / "selection" / "trainer_state.json").read_text())
    assert list(state["selection"]["paths"]) == ["isotropic"] and record["prior"] == "isotropic"


def test_the_rule_takes_the_prior_of_lowest_loss_then_the_largest_ridge_within_one_standard_error():
    def path(*losses):
        return [PathPoint(ridge, 0.5, loss, 1.0, 0.0) for ridge, loss in zip([100.0, 10.0, 1.0], losses)]

    # kfac's best (4.5) is within one error of isotropic's (4.0) but isotropic has the lowest loss: isotropic, and on
    # its path λ = 10 (4.9 ≤ 4.0 + 1) rather than λ = 100 (5.1)
    assert choose({"kfac": path(9.0, 6.0, 4.5), "isotropic": path(5.1, 4.9, 4.0)}) == ("isotropic", 10.0)
    assert choose({"kfac": path(3.0, 3.5, 3.9), "isotropic": path(5.1, 4.9, 4.0)}) == ("kfac", 100.0)


def test_priors_the_loss_cannot_tell_apart_are_decided_by_the_out_of_fold_error():
    def path(accuracy, *losses):
        return [PathPoint(ridge, accuracy, loss, 1.0, 0.0) for ridge, loss in zip([100.0, 10.0, 1.0], losses)]

    paths = {"kfac": path(0.70, 9.0, 6.0, 4.5), "isotropic": path(0.60, 5.1, 4.9, 4.0), "head": path(0.9, 9, 9, 9)}
    assert choose(paths) == ("isotropic", 10.0)  # the loss alone
    assert choose(paths, tied=["kfac"]) == ("kfac", 1.0)  # tied in loss: fewer errors at its own λ
    assert choose(paths, tied=["isotropic"]) == ("isotropic", 10.0)  # the leader itself: nothing changes
    paths["kfac"] = path(0.60, 9.0, 6.0, 4.5)
    assert choose(paths, tied=["kfac"]) == ("isotropic", 10.0)  # equal errors: the leader


def test_resume_after_the_selection_gives_the_same_optimum(tmp_path):
    data = toy_images(20, seed=5)
    first = toy_model()
    solve(first, data, tmp_path, ridge_grid=[1.0, 0.01], tolerance=1e-8)
    resumed = toy_model()
    checkpoint = tmp_path / "run" / "checkpoints" / "selection"
    solve(resumed, data, tmp_path, "again", ridge_grid=[1.0, 0.01], tolerance=1e-8, resume_from=str(checkpoint))
    assert torch.equal(deltas(first), deltas(resumed))
    with pytest.raises(CheckpointError, match="another training set"):
        solve(toy_model(), toy_images(20, seed=6), tmp_path, "other", ridge_grid=[1.0, 0.01], resume_from=str(checkpoint))


def test_folds_are_stratified_balanced_and_a_function_of_the_set_of_images():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    keys = torch.arange(17, dtype=torch.uint8)[:, None]
    folds = stratified_folds(labels, keys, 5, seed=0)
    assert sorted(torch.bincount(folds).tolist()) == [3, 3, 3, 4, 4]
    assert [int((labels[folds == f] == 0).sum()) for f in range(5)] == [2] * 5  # a class spreads evenly
    order = torch.randperm(17, generator=torch.Generator().manual_seed(1))
    assert torch.equal(stratified_folds(labels[order], keys[order], 5, seed=0), folds[order])
    assert not torch.equal(folds, stratified_folds(labels, keys, 5, seed=1))


@pytest.mark.usefixtures("float64")
def test_cross_validation_scores_are_the_refits_without_each_fold(monkeypatch):
    """With exact paths, each image's score is that of the closed-form optimum on the other folds."""
    from test_solve import _keys, brute_force, closed_form, metric_of, problem

    monkeypatch.setattr(selection_module, "PATH_TOLERANCE", {"kfac": 1e-12, "isotropic": 1e-12})
    model, z, labels = problem(12)
    j, residual = brute_force(model, z, labels)
    keys = _keys(len(labels))
    metric = metric_of("kfac", model, z, Flat(model.linearization_point))
    ridges = [10.0, 0.1, 1e-3]
    selection = select(lambda rows: DataTerm(model, z[rows], labels[rows], keys[rows], batch_size=5), labels,
                       keys, [metric], ridges, folds=3, seed=0, max_iterations=40, progress=False)
    folds = stratified_folds(labels, keys, 3, seed=0)
    rows = folds.repeat_interleave(NUM_CLASSES)  # the fold of each row of J
    losses_of = {}
    for point in selection.points:
        losses, correct = torch.zeros(len(labels)), torch.zeros(len(labels), dtype=torch.bool)
        for fold in range(3):
            delta = closed_form(j[rows != fold], residual[rows != fold], point.ridge, metric)
            held = (residual[rows == fold] - j[rows == fold] @ delta).reshape(-1, NUM_CLASSES)  # αy − f_lin
            losses[folds == fold] = 0.5 * held.square().sum(-1)
            prediction = model.config.target_scale * torch.nn.functional.one_hot(labels[folds == fold], NUM_CLASSES) - held
            correct[folds == fold] = prediction.argmax(-1) == labels[folds == fold]
        assert point.validation_loss == pytest.approx(float(losses.mean()), rel=1e-8)
        assert point.standard_error == pytest.approx(float(losses.std() / len(labels) ** 0.5), rel=1e-6)
        assert point.validation_accuracy == pytest.approx(float(correct.double().mean()))
        per_class = [float(correct[labels == c].double().mean()) for c in labels.unique()]
        assert point.validation_balanced_accuracy == pytest.approx(sum(per_class) / len(per_class))
        losses_of[point.ridge] = losses
        if point.ridge == selection.ridge:  # the refit starts from the mean of the folds' optima at the choice
            folds_mean = sum(closed_form(j[rows != f], residual[rows != f], point.ridge, metric) for f in range(3)) / 3
            assert (selection.warm_start - folds_mean).norm() / folds_mean.norm() < 1e-8
            outputs = torch.cat([model.config.target_scale * torch.nn.functional.one_hot(labels[folds == f], NUM_CLASSES)
                                 - (residual[rows == f] - j[rows == f] @ closed_form(j[rows != f], residual[rows != f],
                                                                                    point.ridge, metric)
                                    ).reshape(-1, NUM_CLASSES) for f in range(3)])  # fold by fold: the temperature's data
            assert torch.allclose(selection.out_of_fold[0], outputs, rtol=1e-8, atol=1e-8)
            assert torch.equal(selection.out_of_fold[1], torch.cat([labels[folds == f] for f in range(3)]))
    best = min(losses_of, key=lambda r: float(losses_of[r].mean()))
    margin = float(losses_of[best].std()) / len(labels) ** 0.5
    assert selection.ridge == max(r for r in losses_of if float(losses_of[r].mean()) <= float(losses_of[best].mean()) + margin)
    assert len({round(p.validation_loss, 6) for p in selection.points}) == 3  # λ matters here


def test_solve_needs_the_trunk_cache(tmp_path):
    with pytest.raises(ValueError, match="method='sgd'"):
        solve(toy_model(), toy_images(6, seed=1), tmp_path, cache_trunk=False)


def test_standard_error_is_the_textbook_one():
    values = torch.tensor([0.3, -1.0, 2.5, 0.0, 1.1], dtype=torch.float64)
    expected = float(np.std(values.numpy(), ddof=1) / np.sqrt(5))
    assert _standard_error(values.sum(), values.square().sum(), 5) == pytest.approx(expected, rel=1e-12)


def test_select_alone_scores_the_grid_and_writes_nothing(tmp_path):
    args = LQFTrainingArguments(method="solve", progress=False, output_dir=str(tmp_path / "out"), ridge_grid=[1.0, 0.1])
    selection = LQFTrainer(toy_model(torch.float32), toy_images(30, seed=3), None, args).select()
    assert sorted(selection.paths) == ["head", "isotropic", "kfac"] and selection.points == selection.paths[selection.prior]
    assert all([p.ridge for p in points] == [1.0, 0.1] for points in selection.paths.values())
    assert selection.ridge in (1.0, 0.1)
    assert all(0 <= p.validation_accuracy <= 1 and p.standard_error > 0 for p in selection.points)
    assert not (tmp_path / "out").exists()


def test_objective_needs_a_chosen_prior(tmp_path):
    trainer = LQFTrainer(toy_model(), toy_images(6, seed=1), None,
                         LQFTrainingArguments(method="solve", progress=False, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="train first"):
        trainer.objective()


def test_a_choice_at_the_end_of_the_grid_is_warned_about(tmp_path):
    grid = [1e6, 3e5, 1e5]  # all far too large: the loss is flat, the rule takes the top
    with pytest.warns(UserWarning, match="at an end of `ridge_grid`"):
        record = solve(toy_model(torch.float32), toy_images(30, seed=3), tmp_path, prior="isotropic", ridge_grid=grid)
    assert record["ridge"] == 1e6


@pytest.mark.parametrize("threshold", [-math.inf, math.inf])
def test_the_race_drops_priors_after_a_fold_and_keeps_what_they_scored(monkeypatch, threshold):
    """At threshold −∞ every prior but the leader stops after the first fold (its path keeps that fold's
    scores and products); at +∞ the race never drops one."""
    from test_solve import _keys, metric_of, problem

    monkeypatch.setattr(selection_module, "RACE_THRESHOLD", threshold)
    model, z, labels = problem(15)
    keys = _keys(len(labels))
    flat = Flat(model.linearization_point)
    metrics = [metric_of(kind, model, z, flat) for kind in ("kfac", "isotropic", "head")]
    selection = select(lambda rows: DataTerm(model, z[rows], labels[rows], keys[rows], batch_size=4), labels, keys,
                       metrics, [1.0, 0.01], folds=3, seed=0, max_iterations=30, progress=False)
    first = int((stratified_folds(labels, keys, 3, seed=0) == 0).sum())
    images = {kind: {p.images for p in path} for kind, path in selection.paths.items()}
    if threshold == math.inf:
        assert selection.dropped == {} and all(n == {15} for n in images.values())
    else:
        assert sorted(selection.dropped.values()) == [1, 1] and selection.prior not in selection.dropped
        assert images[selection.prior] == {15} and all(images[k] == {first} for k in selection.dropped)
    assert selection.products["head"] == 0 and selection.products["kfac"] > 0 and selection.products["isotropic"] > 0
    assert selection.iterations == sum(selection.products.values())


def test_each_priors_path_stops_at_its_own_tolerance(monkeypatch):
    """Every fold's path stops where its prior's tolerance says, not another prior's: the products of each prior
    are those of Lanczos runs to that tolerance on the folds' training parts."""
    from test_solve import _keys, metric_of, problem

    tolerances = {"kfac": 1e-1, "isotropic": 1e-3}
    monkeypatch.setattr(selection_module, "PATH_TOLERANCE", tolerances)
    model, z, labels = problem(15)
    keys = _keys(len(labels))
    flat = Flat(model.linearization_point)
    metrics = {kind: metric_of(kind, model, z, flat) for kind in ("kfac", "isotropic")}
    ridges = [1.0, 1e-3]

    def data(rows):
        return DataTerm(model, z[rows], labels[rows], keys[rows], batch_size=4)

    selection = select(data, labels, keys, list(metrics.values()), ridges, folds=3, seed=0, max_iterations=40,
                       progress=False, race=False)
    assignment = stratified_folds(labels, keys, 3, seed=0)

    def products(kind, tolerance):
        return sum(KrylovPath(data((assignment != fold).nonzero().flatten()), metrics[kind], ridges,
                              tolerance=tolerance, max_iterations=40).iterations for fold in range(3))

    assert selection.products == {kind: products(kind, tolerances[kind]) for kind in metrics}
    assert products("kfac", tolerances["isotropic"]) > selection.products["kfac"]
    assert products("isotropic", tolerances["kfac"]) < selection.products["isotropic"]


def test_paired_z_is_the_paired_t_statistic():
    """The race's statistic from running sums equals the textbook paired one from per-image losses."""
    generator = torch.Generator().manual_seed(0)
    losses = {("a", 1.0): torch.rand(9, generator=generator, dtype=torch.float64),
              ("b", 1.0): torch.rand(9, generator=generator, dtype=torch.float64)}

    class Held:
        count, f0, labels = 9, torch.zeros(1), torch.arange(9) % 3
        model = type("Model", (), {"num_classes": 3})
        reduce_sum = gather = staticmethod(lambda t: t)

        @staticmethod
        def outputs(delta):
            return torch.full((9, 3), float(delta[0]))

        @staticmethod
        def scores_of(out):
            return losses[("a", 1.0) if float(out[0, 0]) == 0 else ("b", 1.0)], torch.ones(9, dtype=torch.bool)

    class Path:
        def __init__(self, value):
            self.value = value

        def solution(self, ridge):
            return torch.full((2,), self.value)

        def residual(self, ridge):
            return 0.0

    scores = selection_module._Scores(list(losses))
    scores.add_fold(Held, {"a": Path(0.0), "b": Path(1.0)}, [1.0])
    difference = losses["a", 1.0] - losses["b", 1.0]
    expected = float(difference.mean() / (difference.std() / 3))
    assert scores.paired_z(("a", 1.0), ("b", 1.0)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.usefixtures("float64")
def test_beyond_folds_times_holdout_images_one_held_out_part_scores_the_refit_on_the_rest(monkeypatch):
    """Large N: each λ is scored on one stratified held-out part by the closed-form optimum on every other image;
    the refit starts from that optimum at the choice; passes count the path's products over the fit images."""
    from test_solve import _keys, brute_force, closed_form, metric_of, problem

    monkeypatch.setattr(selection_module, "PATH_TOLERANCE", {"kfac": 1e-12, "isotropic": 1e-12})
    model, z, labels = problem(12)
    j, residual = brute_force(model, z, labels)
    keys = _keys(len(labels))
    metric = metric_of("kfac", model, z, Flat(model.linearization_point))
    ridges = [10.0, 0.1, 1e-3]
    selection = select(lambda rows: DataTerm(model, z[rows], labels[rows], keys[rows], batch_size=5), labels,
                       keys, [metric], ridges, folds=3, seed=0, max_iterations=40, progress=False, holdout_images=4)
    parts = stratified_folds(labels, keys, 3, seed=0)  # 12 images // 4 per part
    held, rows = parts == 0, parts.repeat_interleave(NUM_CLASSES) != 0
    assert selection.scheme == f"one stratified held-out part of {int(held.sum())} of the 12 training images"
    for point in selection.points:
        delta = closed_form(j[rows], residual[rows], point.ridge, metric)
        errors = (residual[~rows] - j[~rows] @ delta).reshape(-1, NUM_CLASSES)
        assert point.images == int(held.sum())
        assert point.validation_loss == pytest.approx(float(0.5 * errors.square().sum(-1).mean()), rel=1e-8)
        if point.ridge == selection.ridge:
            assert (selection.warm_start - delta).norm() / delta.norm() < 1e-8
    assert selection.passes == pytest.approx(selection.iterations * int((~held).sum()) / 12)


def _two_priors(n: int):
    """A float64 problem of ``n`` images with the K-FAC and isotropic priors: ``make_data``, labels, keys, metrics."""
    from test_solve import _keys, metric_of, problem

    model, z, labels = problem(n)
    keys = _keys(len(labels))
    flat = Flat(model.linearization_point)
    make = lambda rows: DataTerm(model, z[rows], labels[rows], keys[rows], batch_size=8)  # noqa: E731
    return make, labels, keys, [metric_of("kfac", model, z, flat), metric_of("isotropic", model, z, flat)]


@pytest.mark.usefixtures("float64")
def test_beyond_folds_times_holdout_images_the_priors_race_on_another_part_first(monkeypatch):
    """A prior dropped in the race on part 1 runs no path over the rest; its race path is kept, scored on part 1."""
    make, labels, keys, metrics = _two_priors(30)
    monkeypatch.setattr(selection_module, "RACE_THRESHOLD", -math.inf)  # all but the leader drop after a fold
    selection = select(make, labels, keys, metrics, [1.0, 0.01], folds=3, seed=0, max_iterations=40,
                       progress=False, holdout_images=10)
    parts = stratified_folds(labels, keys, 3, seed=0)
    [loser] = selection.dropped
    assert selection.dropped[loser] == 1 and selection.prior != loser
    race_fold = stratified_folds(labels[parts == 1], keys[parts == 1], 3, seed=0)
    assert all(p.images == int((race_fold == 0).sum()) for p in selection.paths[loser])  # scored in the race only
    assert all(p.images == int((parts == 0).sum()) for p in selection.points)  # the held-out part
    assert "the prior chosen first by 3-fold cross-validation on another 10" in selection.scheme


@pytest.mark.usefixtures("float64")
def test_beyond_folds_times_holdout_images_only_the_prior_the_sample_chose_runs_a_full_path(monkeypatch):
    """Priors the race keeps are chosen between on the sample (the small-N rule); the others run no path at full N."""
    make, labels, keys, metrics = _two_priors(30)
    monkeypatch.setattr(selection_module, "RACE_THRESHOLD", math.inf)  # nobody drops
    selection = select(make, labels, keys, metrics, [1.0, 0.01], folds=3, seed=0, max_iterations=40,
                       progress=False, holdout_images=10)
    sample = stratified_folds(labels, keys, 3, seed=0) == 1
    on_sample = select(lambda rows: make(sample.nonzero().flatten()[rows]), labels[sample], keys[sample], metrics,
                       [1.0, 0.01], folds=3, seed=0, max_iterations=40, progress=False)
    assert selection.prior == on_sample.prior  # the sample's choice of the prior, λ its own
    [other] = [m.kind for m in metrics if m.kind != selection.prior]
    assert selection.dropped == {other: 3} and selection.paths[other] == on_sample.paths[other]


def test_a_large_training_set_is_solved_with_one_held_out_part_and_the_card_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(selection_module, "HOLDOUT_IMAGES", 6)  # 30 images: 5 parts of 6
    data = toy_images(30, seed=3)
    record = solve(toy_model(torch.float32), data, tmp_path, ridge_grid=[1.0, 0.1], validation_folds=3)
    saved = LQFModel.from_pretrained(tmp_path / "run" / "model")
    assert saved.training_summary["prior_selection"].startswith("one stratified held-out part of 6 of the 30")
    finalists = [r for r in saved.training_summary["selection"] if r["prior"] not in record["dropped_priors"]]
    assert finalists and all(r["images"] == 6 for r in finalists)
    assert record["relative_gradient_norm"] <= 1e-4 and (tmp_path / "run" / "path.png").exists()
    assert record["passes"] == pytest.approx(record["selection_passes"] + record["iterations"])


def test_the_evidence_can_choose_the_prior_and_ridge_instead(tmp_path):
    from lqf_hub.solver.evidence import EVIDENCE_TOLERANCE, evidence_path
    from lqf_hub.training.trainer import EVIDENCE_PROBES

    data, ridges = toy_images(30, seed=3), [1.0, 0.1, 0.01]
    model = toy_model(torch.float32)
    args = LQFTrainingArguments(method="solve", progress=False, output_dir=str(tmp_path / "run"), ridge_grid=ridges,
                                select="evidence", dataset_name="toy")
    trainer = LQFTrainer(model, data, None, args)
    record = trainer.train()[-1]
    # the same evidence computed apart (test_evidence.py holds it to the Gaussian density of the targets)
    objective, metrics = trainer.data_term(), trainer.priors("auto")
    paths = {kind: evidence_path(objective, metric, ridges, probes=EVIDENCE_PROBES, seed=args.seed,
                                 tolerance=EVIDENCE_TOLERANCE,
                                 max_iterations=300) for kind, metric in metrics.items()}
    values = {(kind, r): v for kind, path in paths.items() for r, v in zip(path.ridges, path.log_evidence)}
    prior, ridge = max(values, key=values.get)
    assert (record["prior"], record["ridge"]) == (prior, ridge)
    assert record["relative_gradient_norm"] <= 1e-4  # certified like any other choice
    assert record["path_products"] == {kind: path.products for kind, path in paths.items()}
    assert model.config.temperature == 1.0  # no held-out outputs to fit it on
    sigma2 = paths[prior].noise_variance[paths[prior].ridges.index(ridge)]
    assert model.posterior.noise_variance == pytest.approx(sigma2, rel=1e-6)
    assert (tmp_path / "run" / "path.png").read_bytes()[:4] == b"\x89PNG"
    saved = LQFModel.from_pretrained(tmp_path / "run" / "model")
    assert saved.training_summary["prior_selection"].startswith("the evidence (marginal likelihood) over all 30")
    assert saved.training_summary["selection"] == [] and len(saved.training_summary["evidence"]) == 9
    card = ModelCard.load(tmp_path / "run" / "model" / "README.md").text
    assert "log evidence per image" in card and f"| **{prior}** | **{ridge}** | **{values[prior, ridge]:.4f}** |" in card
    with pytest.raises(ValueError, match="select"):
        LQFTrainingArguments(select="marginal")
