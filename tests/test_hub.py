"""Checkpoints: bit-exact round trips, delta-only checkpoints, bad files, model cards."""

import json
import pickle

import pytest
import torch
from conftest import build
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from lqf_hub import LQFConfig, LQFModel
from lqf_hub.hub import CONFIG_FILE, WEIGHTS_FILE, CheckpointError


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
    with pytest.raises(ValueError, match="base='reference' needs a backbone that can be fetched again"):
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


def test_no_config(saved):
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="not an lqf-hub checkpoint: config.json is missing"):
        LQFModel.from_pretrained(saved)


def test_failed_save_leaves_the_old_checkpoint_intact(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model, _ = build("timm-efficientnet", dtype=torch.float32, seed=5, linearize="last:1")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lqf_hub.hub.save_file", crash)
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
    info = HfApi().model_info("alice/lqf-vit", token=token, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] < 0.5 * sum(p.numel() * 4 for p in base.parameters())

    with torch.no_grad():  # the base repo moves on; the checkpoint still loads the commit it was trained on
        next(base.parameters()).add_(1.0)
    base.push_to_hub("alice/vit-base", token=token)
    assert_same_model(model, LQFModel.from_pretrained("alice/lqf-vit", token=token), x)
