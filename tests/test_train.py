"""The trainer and its SGD loop: convexity, the closed-form optimum, multi-process equivalence, resume, bad input.
(The solver's runs: test_optimum.py.)"""

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import pretrained_network
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from torch.func import jacrev

from lqf_hub import CheckpointError, LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments, TrainingDiverged

HERE = Path(__file__).parent
NUM_CLASSES = 3


def toy_images(n: int, seed: int, size: int = 32) -> list[dict]:
    """Class prototypes plus noise: learnable, deterministic."""
    prototypes = torch.randn(NUM_CLASSES, 3, size, size, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = prototypes[labels] + 0.7 * torch.randn(n, 3, size, size, generator=generator)
    return [{"pixel_values": images[i], "label": int(labels[i])} for i in range(n)]


def toy_model(dtype=torch.float64, **config) -> LQFModel:
    """The tail is the neck (1x1 conv, BatchNorm) and the head: float64 depthwise convs are slow on CPU."""
    network, _ = pretrained_network("timm-efficientnet")
    config = {"linearize": ["conv_head", "bn2"], "ridge": 0.1, **config}
    return LQFModel.from_timm(network, NUM_CLASSES, LQFConfig(**config)).to(dtype)


def deltas(model: LQFModel) -> torch.Tensor:
    return torch.cat([d.detach().flatten() for d in model.delta.values()])


def closed_form(model: LQFModel, data: list[dict]) -> torch.Tensor:
    """argmin mean_i ½‖f0_i + J_iδ − αy_i‖² + (λ/2)‖δ‖² by brute force, in the dual: Jᵀ(JJᵀ + NλI)⁻¹(αY − f0)."""
    x = torch.stack([d["pixel_values"] for d in data]).to(torch.float64)
    y = torch.tensor([d["label"] for d in data])
    z = model.encode_trunk(x)
    w0 = model.linearization_point
    call = model.tail_function(z)
    jac = jacrev(lambda p: call(p))(dict(w0))  # name -> [N, C, *shape]
    n = len(data)
    j = torch.cat([jac[name].reshape(n * NUM_CLASSES, -1) for name in model.linearized_parameters], dim=1)
    residual = (model.config.target_scale * torch.nn.functional.one_hot(y, NUM_CLASSES) - model.base_forward(x)).flatten()
    return j.T @ torch.linalg.solve(j @ j.T + n * model.config.ridge * torch.eye(len(residual)), residual)


def train(model, data, tmp_path, name="run", eval_data=None, **args) -> list[dict]:
    args = {"method": "sgd", "epochs": 30, "batch_size": len(data), "progress": False, "output_dir": str(tmp_path / name),
            "save_every": 1000, **args}
    return LQFTrainer(model, data, eval_data, LQFTrainingArguments(**args)).train()


def test_trained_delta_is_the_closed_form_optimum(tmp_path):
    data = toy_images(24, seed=1)
    model = toy_model()
    train(model, data, tmp_path, epochs=150, lr_schedule="constant")
    expected = closed_form(model, data)
    error = (deltas(model) - expected).norm() / expected.norm()
    assert error < 1e-3, error


def test_different_data_orders_reach_the_same_optimum(tmp_path):
    data = toy_images(32, seed=2)
    first, second = toy_model(), toy_model()
    train(first, data, tmp_path, "a", batch_size=16, epochs=150, seed=1)
    train(second, data, tmp_path, "b", batch_size=16, epochs=150, seed=2)
    a, b = deltas(first), deltas(second)
    assert (a - b).norm() / a.norm() < 1e-3, (a - b).norm() / a.norm()


def test_preconditioning_converges_faster_than_plain_sgd(tmp_path):
    data = toy_images(24, seed=1)
    optimum = closed_form(toy_model(ridge=1e-2), data)
    errors = {}
    for preconditioner in ("kfac", "none"):  # both with the step size from their own curvature
        model = toy_model(ridge=1e-2)  # light damping: K-FAC's full effect (the default trades speed for regularity)
        train(model, data, tmp_path, preconditioner, epochs=100, preconditioner=preconditioner, lr_schedule="constant",
              damping=1e-3)
        errors[preconditioner] = float((deltas(model) - optimum).norm() / optimum.norm())
    assert errors["kfac"] * 2 < errors["none"], errors


def test_outputs_metrics_curves_and_checkpoints(tmp_path):
    history = train(toy_model(torch.float32), toy_images(12, 4), tmp_path, epochs=3, eval_data=toy_images(9, 5),
                    save_every=1)
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and lines == history
    assert 0 <= history[-1]["eval_accuracy"] <= 1 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-2", "epoch-3"]


def test_train_ships_the_model_with_a_filled_card(tmp_path):
    model, eval_data = toy_model(torch.float32), toy_images(9, 5)
    history = train(model, toy_images(12, 4), tmp_path, epochs=2, eval_data=eval_data, dataset_name="toy-shapes",
                    eval_split_name="validation")
    saved = LQFModel.from_pretrained(tmp_path / "run" / "model")  # no save_pretrained call by the user
    x = torch.stack([d["pixel_values"] for d in eval_data])
    assert torch.equal(saved(x), model(x))
    summary = saved.training_summary
    assert summary["metrics"]["accuracy"] == history[-1]["eval_accuracy"] and summary["eval_samples"] == 9
    card = ModelCard.load(tmp_path / "run" / "model" / "README.md")
    result = card.data.eval_results[0]
    assert (result.dataset_name, result.dataset_split, result.metric_type) == ("toy-shapes", "validation", "accuracy")
    assert result.metric_value == history[-1]["eval_accuracy"]
    assert f"| accuracy | {history[-1]['eval_accuracy']:.4f} |" in card.text


def script_env() -> dict[str, str]:
    """One thread (reproducible), and this test directory importable beside what the tests import."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = script_env()
    return subprocess.run([sys.executable, str(HERE / "resumable_train.py"), *argv], env=env, timeout=300,
                          capture_output=True, text=True)


def test_resume_after_kill_9_mid_epoch_is_bit_identical_and_nothing_is_pickled(tmp_path):
    assert run_script(str(tmp_path / "full"), str(tmp_path / "full.safetensors")).returncode == 0
    # 16 images, batch 4: 4 steps an epoch; step 10 is in the middle of epoch 3
    killed = run_script(str(tmp_path / "split"), str(tmp_path / "unused"), "--kill-at-step", "10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = tmp_path / "split" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-1", "epoch-2"]  # and no half-written one
    resumed = run_script(str(tmp_path / "split"), str(tmp_path / "split.safetensors"),
                         "--resume-from", str(checkpoints / "epoch-2"))
    assert resumed.returncode == 0, resumed.stderr
    full, split = (load_file(tmp_path / f"{name}.safetensors")["delta"] for name in ("full", "split"))
    assert torch.equal(full, split)
    lines = [json.loads(line)["epoch"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4]
    files = [p for p in (tmp_path / "split").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".jsonl", ".safetensors", ".png", ".md"}, files
    for path in files:  # neither a pickle (protocol 2+ starts with 0x80) nor a torch.save zip
        assert not path.read_bytes().startswith((b"PK", b"\x80")), path


def test_resume_on_another_training_set_is_refused(tmp_path):
    train(toy_model(), toy_images(8, seed=11), tmp_path, "run", epochs=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch-1"
    other = toy_images(8, seed=12)  # same size, classes and settings; other images
    with pytest.raises(CheckpointError, match="another training set"):
        train(toy_model(), other, tmp_path, "run", epochs=2, resume_from=str(checkpoint))
    relabelled = [{**item, "label": (item["label"] + 1) % NUM_CLASSES} for item in toy_images(8, seed=11)]
    with pytest.raises(CheckpointError, match="another training set"):
        train(toy_model(), relabelled, tmp_path, "run", epochs=2, resume_from=str(checkpoint))


@pytest.mark.parametrize("method", ["sgd", "solve"])
def test_two_processes_match_one(method, tmp_path):
    script = HERE / "multiprocess_train.py"
    env = script_env()
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors"), str(tmp_path / "s"), method],
                   check=True, env=env, timeout=300)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    subprocess.run([*launch, str(script), str(tmp_path / "two.safetensors"), str(tmp_path / "d"), method],
                   check=True, env=env, timeout=300)
    (one, one_meta), (two, two_meta) = (_load_with_metadata(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert (one_meta["processes"], two_meta["processes"]) == ("1", "2")
    # sums run in another order; the SGD loop stays within rounding, the solver within its 1e-8 certificate
    error = (two["delta"] - one["delta"]).norm() / one["delta"].norm()
    assert error < {"sgd": 1e-10, "solve": 1e-6}[method], error


def _load_with_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


# ----------------------------------------------------------------------------------- bad input
def test_empty_dataset():
    with pytest.raises(ValueError, match="`train_dataset` is empty"):
        LQFTrainer(toy_model(), [], None, LQFTrainingArguments(progress=False))


def test_labels_outside_num_classes(tmp_path):
    data = toy_images(6, 7) + [{"pixel_values": torch.zeros(3, 32, 32), "label": 5}]
    with pytest.raises(ValueError, match="label 5, outside 0..2; the model has num_classes=3"):
        train(toy_model(), data, tmp_path)


def test_one_image_per_class_cannot_choose_the_prior_or_lambda_but_can_be_solved_at_fixed_ones(tmp_path):
    one_each, evaluation = toy_images(NUM_CLASSES, 7), toy_images(6, 8)
    trainer = LQFTrainer(toy_model(), one_each, evaluation, LQFTrainingArguments(
        output_dir=str(tmp_path / "auto"), method="solve", progress=False))
    with pytest.raises(ValueError, match="Every class has one training image.*--prior isotropic --ridge-grid 300"):
        trainer.train()
    assert "eval" not in trainer._inputs  # refused before the evaluation images' trunk outputs
    fixed = train(toy_model(), one_each, tmp_path, "fixed", method="solve", prior="isotropic", ridge_grid=[300.0])
    assert fixed[-1]["ridge"] == 300.0 and fixed[-1]["relative_gradient_norm"] <= 1e-4
    evident = train(toy_model(), one_each, tmp_path, "evidence", method="solve", select="evidence")  # holds none out
    assert evident[-1]["ridge"] in LQFTrainingArguments().ridge_grid and evident[-1]["relative_gradient_norm"] <= 1e-4


def test_a_class_with_one_image_is_warned_about():
    from lqf_hub.solver.selection import check_classes

    with pytest.warns(UserWarning, match="1 class has one training image"):
        check_classes(torch.tensor([0, 0, 1, 2, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_classes(torch.tensor([0, 0, 1, 1, 2, 2]))


def test_mismatched_image_sizes(tmp_path):
    data = toy_images(4, 8) + toy_images(4, 9, size=40)
    with pytest.raises(ValueError, match="different sizes"):
        train(toy_model(), data, tmp_path, batch_size=8)


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    data = toy_images(8, 10)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1.*Lower --learning-rate"):
        train(toy_model(), data, tmp_path, batch_size=4, learning_rate=1e6, momentum=0.0)


def test_resume_with_another_config_is_refused_and_writes_nothing(tmp_path):
    data = toy_images(8, 11)
    train(toy_model(), data, tmp_path, "run", epochs=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch-1"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(ValueError, match="another model config"):
        train(toy_model(ridge=0.5), data, tmp_path, "run", epochs=2, resume_from=str(checkpoint))
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}


def test_argument_validation():
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        LQFTrainingArguments(batch_size=0)
    with pytest.raises(ValueError, match="`preconditioner` must be one of 'kfac', 'none', got 'shampoo'"):
        LQFTrainingArguments(preconditioner="shampoo")
    with pytest.raises(ValueError, match="`loss` must be one of 'mse', 'cross_entropy', got 'hinge'"):
        LQFTrainingArguments(loss="hinge")


def test_large_caches_go_to_a_memory_mapped_file_with_the_same_result(tmp_path):
    data = toy_images(8, seed=14)
    in_memory, mapped = toy_model(), toy_model()
    train(in_memory, data, tmp_path, "memory", epochs=2)
    arguments = LQFTrainingArguments(output_dir=str(tmp_path / "mapped"), method="sgd", epochs=2, batch_size=8,
                                     progress=False, cache_in_memory_gb=0)
    trainer = LQFTrainer(mapped, data, None, arguments)
    trainer.train()
    assert isinstance(trainer.inputs("train").values, __import__("numpy").memmap)
    assert list((tmp_path / "mapped" / "cache").glob("train-*.npy"))
    assert torch.equal(deltas(mapped), deltas(in_memory))


def test_a_saved_trunk_cache_round_trips_bit_exactly_and_trains_to_the_same_delta(tmp_path):
    from lqf_hub.training.cache import TrunkCache

    data = toy_images(8, seed=15)
    direct, from_cache = toy_model(), toy_model()
    trainer = LQFTrainer(direct, data, None, LQFTrainingArguments(output_dir=str(tmp_path / "direct"), method="sgd",
                                                                  epochs=2, batch_size=8, progress=False))
    trainer.train()
    cache = trainer.inputs("train")
    cache.save(tmp_path / "trunk.safetensors", "this model")
    kept = TrunkCache.load(tmp_path / "trunk.safetensors", "this model")
    assert torch.equal(torch.as_tensor(kept.values), torch.as_tensor(cache.values)) and torch.equal(kept.labels, cache.labels)
    assert kept.fingerprint == cache.fingerprint
    train(from_cache, kept, tmp_path, "kept", epochs=2)
    assert torch.equal(deltas(from_cache), deltas(direct))
    assert TrunkCache.load(tmp_path / "trunk.safetensors", "another model") is None
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "trunk.safetensors").read_bytes()[:100])
    assert TrunkCache.load(tmp_path / "cut.safetensors", "this model") is None
    with pytest.raises(ValueError, match="TrunkCache .* needs cache_trunk=True"):
        LQFTrainer(toy_model(), kept, None, LQFTrainingArguments(output_dir=str(tmp_path / "no"), method="sgd",
                                                                 cache_trunk=False, progress=False)).inputs("train")


def test_a_float16_cache_halves_the_memory_and_solves_the_objective_of_the_stored_values(tmp_path):
    import numpy as np

    from lqf_hub.training.arguments import objective_settings
    from lqf_hub.training.cache import TrunkCache

    data = toy_images(12, seed=16)
    half, rounded = toy_model(), toy_model()
    args = {"method": "solve", "prior": "isotropic", "ridge_grid": [0.1], "tolerance": 1e-10, "progress": False}
    trainer = LQFTrainer(half, data, toy_images(6, seed=18),  # evaluation reads the float16 cache too
                         LQFTrainingArguments(output_dir=str(tmp_path / "half"), cache_dtype="float16", **args))
    record = trainer.train()[-1]
    stored = trainer.inputs("train")
    assert stored.values.dtype == np.float16
    full = LQFTrainer(toy_model(), data, None, LQFTrainingArguments(output_dir=str(tmp_path / "full"), **args)).inputs("train")
    assert stored.values.nbytes * 4 == full.values.nbytes  # float64 model: a quarter
    assert np.array_equal(stored.values, full.values.astype(np.float16))
    as_solved = TrunkCache(stored.values.astype(np.float64), stored.labels, stored.digests)  # the same numbers
    LQFTrainer(rounded, as_solved, None, LQFTrainingArguments(output_dir=str(tmp_path / "rounded"), **args)).train()
    assert torch.equal(deltas(half), deltas(rounded))
    assert objective_settings(half.training_summary)["cache_dtype"] == "float16"
    assert set(record["stage_seconds"]) == {"caching", "objective", "selection", "refit", "evaluation"}
    assert 0 <= record["eval_accuracy"] <= 1
    assert record["passes"] == record["iterations"] and record["peak_rss_gb"] > 0.1


def test_a_float16_cache_refuses_outputs_beyond_its_range(tmp_path):
    huge = [{"pixel_values": 1e9 * d["pixel_values"], "label": d["label"]} for d in toy_images(3, seed=17)]
    trainer = LQFTrainer(toy_model(), huge, None, LQFTrainingArguments(output_dir=str(tmp_path), cache_dtype="float16",
                                                                      progress=False))
    with pytest.raises(ValueError, match="beyond float16's range .* cache_dtype='float32'"):
        trainer.inputs("train")
