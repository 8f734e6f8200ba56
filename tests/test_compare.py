"""`lqf-hub compare`: shared held-out split, choices on validation only, resumable runs, the report's numbers."""

import json
import math

import pytest
import torch

from lqf_hub.cli import main
from lqf_hub.compare.report import markdown, paired_difference, summarize, targets
from lqf_hub.compare.runner import (
    DATA_FIELDS,
    METHODS,
    PRESETS,
    PROBIT,
    RUNS_FILE,
    SOFTMAX,
    SUPERSEDED_FILE,
    TEMPERATURE_SCALED,
    CompareSettings,
    _backbone,
    _choose,
    _decoded,
    _digest,
    _draw,
    _load_splits,
    load_runs,
    run_comparison,
    stratified_split,
)
from lqf_hub.training.cache import content_digests

# Every method, scaled to seconds: the embedded Lite0 at 32 px, 2-3 images per class, one-value grids mostly.
TINY = dict(dataset="mnist-5k", image_size=32, shots=[3], seeds=[0], test_per_class=2, linearize="bn2",
            ft_learning_rates=[0.01], ft_augmentations=["none", "timm"], ft_epochs=1, ft_min_steps=2,
            sgd_epochs=[1, 2], probe_weight_decays=[1e-2, 1.0])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    output = tmp_path_factory.mktemp("compare")
    settings = CompareSettings(**TINY)
    return settings, output, run_comparison(settings, output, progress=False, command="lqf-hub compare --tiny")


def test_every_method_runs_once_per_draw_with_its_choice_made_on_validation(swept):
    settings, output, runs = swept
    assert sorted(r["method"] for r in runs) == sorted(METHODS)
    lines = [json.loads(line) for line in (output / RUNS_FILE).read_text().splitlines()]
    assert lines == runs
    for run in runs:
        assert 0 <= run["accuracy"] <= 1 and run["error"] == pytest.approx(1 - run["accuracy"]) and run["seconds"] > 0
        assert run["chosen"], run  # every method chose something on the held-out images
    by_method = {r["method"]: r for r in runs}
    assert len(by_method["fine-tuning"]["validation"]) == 2  # 1 learning rate x 2 augmentations, each scored
    assert [v["epochs"] for v in by_method["lqf-cross-entropy"]["validation"]] == [1, 2]
    assert by_method["lqf"]["certificate"]["relative_gradient_norm"] <= 1e-4
    assert by_method["lqf"]["chosen"]["ridge"] in [v["ridge"] for v in by_method["lqf"]["validation"]]
    for run in runs:  # every method scores its probabilities on the test images
        for metrics in run["probabilities"].values():
            assert metrics["nll"] > 0 and 0 <= metrics["ece"] <= 1 and 0 <= metrics["brier"] <= 2, run
    fine_tuning, laplace = by_method["fine-tuning"], by_method["laplace"]
    assert set(fine_tuning["probabilities"]) == {SOFTMAX, TEMPERATURE_SCALED} and fine_tuning["temperature"] > 0
    assert laplace["chosen"] == by_method["linear-probe"]["chosen"] and laplace["prior_precision"] > 0  # the probe's MAP
    assert (output / "error_vs_shots.png").read_bytes()[:4] == b"\x89PNG"
    report = (output / "results.md").read_text()
    assert "lqf-hub compare --tiny" in report and "| lqf |" in report and "| fine-tuning |" in report
    assert f"| fine-tuning | {TEMPERATURE_SCALED} |" in report and f"| laplace | {PROBIT} |" in report
    assert json.loads((output / "results.json").read_text())["runs"] == runs


def test_restart_skips_finished_runs_and_adds_only_what_is_missing(swept, tmp_path):
    settings, output, runs = swept
    again = run_comparison(settings, output, progress=False)
    assert again == runs  # nothing re-run
    more = CompareSettings(**{**TINY, "methods": ["lqf", "linear-probe"], "seeds": [0, 1]})
    grown = run_comparison(more, output, progress=False)
    added = grown[len(runs):]
    assert sorted((r["method"], r["seed"]) for r in added) == [("linear-probe", 1), ("lqf", 1)]


def test_runs_of_other_settings_or_a_cut_line_are_refused(swept, tmp_path):
    settings, output, runs = swept
    with pytest.raises(ValueError, match="another comparison"):
        load_runs(output, CompareSettings(**{**TINY, "image_size": 48}))
    (tmp_path / RUNS_FILE).write_text(json.dumps(runs[0]) + "\n{\"method\": \"lq")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_runs(tmp_path, settings)


def test_a_changed_grid_reruns_that_method_only_and_keeps_its_old_runs(swept, tmp_path):
    settings, output, _ = swept
    runs = load_runs(output, settings)  # with what the restart test added
    (tmp_path / RUNS_FILE).write_text((output / RUNS_FILE).read_text())
    probes = [r for r in runs if r["method"] in ("linear-probe", "laplace")]  # Laplace sits on the probe's MAP
    wider = CompareSettings(**{**TINY, "probe_weight_decays": [1e-2, 1.0, 100.0]})
    with pytest.warns(UserWarning, match=f"{len(probes)} run"):
        kept = load_runs(tmp_path, wider)
    assert kept == [r for r in runs if r["method"] not in ("linear-probe", "laplace")]
    assert [json.loads(line) for line in (tmp_path / SUPERSEDED_FILE).read_text().splitlines()] == \
        probes
    rerun = run_comparison(CompareSettings(**{**TINY, "probe_weight_decays": [1e-2, 1.0, 100.0],
                                              "methods": ["linear-probe"]}), tmp_path, progress=False)
    assert sorted((r["method"], r["seed"]) for r in rerun[len(kept):]) == [("linear-probe", 0)]
    assert [v["weight_decay"] for v in rerun[-1]["validation"]] == [1e-2, 1.0, 100.0]


def test_the_held_out_split_is_stratified_by_content(tmp_path):
    settings = CompareSettings(**TINY)
    train_full, test = _load_splits(settings)
    from lqf_hub.adapters import backbone_from_name

    config = {**backbone_from_name(settings.model).data_config, "input_size": [3, 32, 32]}
    draw = _draw(train_full, _decoded(test, config), 3, 0, settings.validation_fraction, config)
    assert len(draw.held) == 10 and len(draw.fit) == 20  # one of three per class held out
    assert set(draw.held.tolist()).isdisjoint(draw.fit.tolist())
    labels = torch.tensor([item["label"] for item in draw.train_items])
    assert torch.bincount(labels[draw.held]).tolist() == [1] * 10
    keys = content_digests(draw.train_items)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    fit, held = stratified_split(labels[order], keys[order], settings.validation_fraction, seed=0)
    assert sorted(order[held].tolist()) == draw.held.tolist()  # the images decide, not their order


def test_stratified_split_holds_out_every_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    keys = torch.arange(17, dtype=torch.uint8)[:, None]
    fit, held = stratified_split(labels, keys, 0.2, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(17))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 1, 1]
    assert torch.equal(held, stratified_split(labels, keys, 0.2, seed=0)[1])
    assert not torch.equal(held, stratified_split(labels, keys, 0.2, seed=1)[1])


def test_choose_takes_the_best_accuracy_then_the_lower_loss_then_the_first():
    scores = {1: (0.5, 1.0), 2: (0.8, 2.0), 3: (0.8, 1.5), 4: (0.8, 1.5)}
    chosen, validation = _choose([{"x": k} for k in scores], lambda c: scores[c["x"]])
    assert chosen == {"x": 3} and [v["accuracy"] for v in validation] == [0.5, 0.8, 0.8, 0.8]


def _run(method, shots, seed, error, seconds=1.0):
    return {"method": method, "shots": shots, "seed": seed, "error": error, "accuracy": 1 - error, "seconds": seconds,
            "chosen": {}}


def test_summary_relative_error_paired_difference_and_targets():
    runs = [_run("fine-tuning", 5, s, e) for s, e in enumerate([0.20, 0.30, 0.25])]
    runs += [_run("lqf", 5, s, e) for s, e in enumerate([0.18, 0.26, 0.22])]
    runs += [_run("fine-tuning", 100, 0, 0.10), _run("lqf", 100, 0, 0.104), _run("lqf-relu", 5, 0, 0.5),
             _run("lqf-relu", 100, 0, 0.09), _run("linear-probe", 5, 0, math.nan)]
    table = summarize(runs)
    assert table["lqf"][5]["error"] == pytest.approx(0.22) and table["lqf"][5]["sd"] == pytest.approx(0.04)
    assert table["lqf"][5]["relative"] == pytest.approx(0.22 / 0.25 - 1)
    assert table["linear-probe"][5]["n"] == 0 and table["linear-probe"][5]["failed"] == 1
    mean, se, n = paired_difference(table, "lqf", "fine-tuning", 5)
    assert (mean, n) == (pytest.approx(-0.03), 3) and se == pytest.approx(0.01 / math.sqrt(3))
    lines = "\n".join(targets(table))
    assert "100 shots met (+4%" in lines  # within 5% relative
    assert "5 shots met (-12%; paired difference -3.0 ± 0.6 points (n=3))" in lines  # 5 standard errors: not noise
    assert "100 shots met (+4%; paired difference +0.4 points on one seed: its noise is not known)" in lines
    assert "lqf-relu costs accuracy: **missed** (worse than LQF at 1 of 2" in lines


def test_settings_refuse_one_shot_and_unknown_methods():
    with pytest.raises(ValueError, match="none can be held out"):
        CompareSettings(shots=[1, 5])
    with pytest.raises(ValueError, match="Unknown method"):
        CompareSettings(methods=["lqf", "magic"])
    with pytest.raises(ValueError, match="ft_augmentations"):
        CompareSettings(ft_augmentations=["mixup"])


def test_all_training_images_is_shots_zero_drawn_whole_and_reported_last(tmp_path):
    settings = CompareSettings(**{**TINY, "shots": [0, 3]})
    train_full, test = _load_splits(settings)
    train_full = train_full.select(range(40))
    from lqf_hub.adapters import backbone_from_name

    config = {**backbone_from_name(settings.model).data_config, "input_size": [3, 32, 32]}
    draw = _draw(train_full, _decoded(test, config), 0, 0, settings.validation_fraction, config)
    assert len(draw.train) == 40 and sorted(draw.fit.tolist() + draw.held.tolist()) == list(range(40))
    runs = [{**_run(m, s, 0, 0.1), "images_per_class": 500 if s == 0 else s} for m in ("fine-tuning", "lqf")
            for s in (0, 100)]
    text = markdown(CompareSettings(), runs)
    assert "| method | 100 shots | all images |" in text
    assert "≥ 100 shots, LQF within 5% relative error of fine-tuning: all images met" in text


def test_settings_check_the_base_weights_and_the_presets(tmp_path):
    with pytest.raises(ValueError, match="`weights` .*missing.safetensors does not exist"):
        CompareSettings(weights=str(tmp_path / "missing.safetensors"))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a Hugging Face repo id"):
        CompareSettings(model="google/vit-base-patch16-224", weights=str(tmp_path / "w.safetensors"))
    assert PRESETS["cpu128"].image_size == 128 and 100 in PRESETS["cpu128"].shots
    # unset weights leave the fingerprint of runs written before the option existed
    assert CompareSettings().data_fingerprint() == _digest(
        {k: getattr(CompareSettings(), k) for k in DATA_FIELDS if k != "weights"})


def test_the_base_weights_file_replaces_the_pretrained_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp_path / "w.safetensors")
    backbone = _backbone(CompareSettings(weights=str(tmp_path / "w.safetensors")))
    mine = dict(backbone.network.named_parameters())
    assert torch.equal(mine["conv_stem.weight"], network.conv_stem.weight)
    assert not torch.equal(_backbone(CompareSettings()).network.conv_stem.weight, network.conv_stem.weight)


def test_markdown_names_every_method_and_shot_count():
    runs = [_run(m, s, 0, 0.1 * (i + 1)) for i, m in enumerate(["fine-tuning", "lqf"]) for s in (2, 10)]
    text = markdown(CompareSettings(), runs, "lqf-hub compare")
    assert "| method | 2 shots | 10 shots |" in text and "| lqf | 20.0 (+100%) · 1 s |" in text
    timed = [_run(m, s, 0, 0.1, seconds=seconds) for m, seconds in (("fine-tuning", 90), ("lqf", 150)) for s in (2, 10)]
    assert "add up to 8 minutes (per method: fine-tuning 3.0, lqf 5.0)" in markdown(CompareSettings(), timed)


def test_cli_compare_writes_the_report_and_refuses_a_foreign_directory(tmp_path, capsys):
    argv = ["compare", "--dataset", "mnist-5k", "--image-size", "32", "--shots", "2", "--seeds", "0",
            "--test-per-class", "2", "--methods", "lqf", "linear-probe", "--linearize", "bn2",
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| lqf |" in out and "| linear-probe |" in out
    assert "lqf-hub compare --dataset mnist-5k" in (tmp_path / "out" / "results.md").read_text()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert main([*argv[:-1], str(tmp_path / "foreign")]) == 2
    assert "not written by lqf-hub" in capsys.readouterr().err
    assert main(["compare", "--shots", "1", "--output-dir", str(tmp_path / "one")]) == 2
    assert "none can be held out" in capsys.readouterr().err


def test_a_best_candidate_at_the_end_of_its_grid_is_flagged():
    from lqf_hub.compare.report import at_grid_edge

    path = [{"ridge": r, "loss": loss, "accuracy": 0.5} for r, loss in ((10.0, 3.0), (1.0, 2.0), (0.1, 1.0))]
    assert at_grid_edge({"chosen": {"ridge": 1.0}, "validation": path})  # lowest loss at the smallest λ
    path[2]["loss"] = 2.5
    assert not at_grid_edge({"chosen": {"ridge": 1.0}, "validation": path})
    assert at_grid_edge({"chosen": {"ridge": 10.0}, "validation": path})  # the rule climbed to the top
    rates = [{"learning_rate": lr, "augmentation": "none", "loss": 1.0, "accuracy": 0.5} for lr in (0.01, 0.03, 0.1)]
    assert at_grid_edge({"chosen": {"learning_rate": 0.1, "augmentation": "none"}, "validation": rates})
    assert not at_grid_edge({"chosen": {"learning_rate": 0.03, "augmentation": "none"}, "validation": rates})
