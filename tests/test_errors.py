"""Config validation and bad input: each a clear error that names the problem and the fix."""

import json
import warnings

import pytest
import timm
import torch
from conftest import build, pretrained_network
from transformers import ViTConfig, ViTModel

from lqf_hub import LQFConfig, LQFModel


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "relu"}, "`activation` must be one of 'leaky', 'tangent', 'none', got 'relu'"),
        ({"head_init": "xavier"}, "`head_init` must be one of"),
        ({"linearize": "last:0"}, "N >= 1"),
        ({"linearize": "blocks"}, "`linearize` must be 'head', 'all', 'last:N'"),
        ({"linearize": []}, "non-empty module-name prefixes"),
        ({"leaky_slope": 1.5}, "`leaky_slope` must be in \\(0, 1\\), got 1.5"),
        ({"target_scale": 0}, "`target_scale` must be > 0"),
        ({"ridge": -1e-3}, "`ridge` must be >= 0"),
        ({"num_classes": -3}, "`num_classes` must be >= 1, got -3"),
        ({"head_init": "zeros", "linearize": "last:1"}, "Jacobian of every backbone parameter zero"),
        ({"num_classes": 2, "id2label": {0: "a", 5: "b"}}, "`id2label` must have exactly the keys 0..1"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LQFConfig(**kwargs)


def test_config_json_round_trip_and_unknown_keys():
    config = LQFConfig(linearize=["blocks.5", "conv_head"], num_classes=2, id2label={0: "cat", 1: "dog"})
    data = json.loads(json.dumps(config.to_dict()))
    assert LQFConfig.from_dict(data) == config  # id2label keys come back as ints
    with pytest.warns(UserWarning, match="unknown LQFConfig keys \\['future_option'\\]"):
        assert LQFConfig.from_dict({**data, "future_option": 1}) == config


def test_unknown_timm_model_suggests_names():
    with pytest.raises(ValueError, match="Unknown timm model 'tf_efficientnet_lite9'.*Did you mean"):
        LQFModel.from_timm("tf_efficientnet_lite9", num_classes=3, pretrained=False)


def test_model_without_classifier():
    headless = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="no linear classifier to replace"):
        LQFModel.from_timm(headless, num_classes=3)
    vit = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                             image_size=16, patch_size=8))
    with pytest.raises(ValueError, match="no `classifier` to replace"):
        LQFModel.from_transformers(vit, num_classes=3)


@pytest.mark.parametrize("num_classes", [0, -1])
def test_num_classes_below_one(num_classes):
    network, _ = pretrained_network("timm-resnet")
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 1"):
        LQFModel.from_timm(network, num_classes=num_classes)


def test_pretrained_head_with_other_class_count():
    network, _ = pretrained_network("timm-resnet")
    with pytest.raises(ValueError, match="has 7 classes, but num_classes=3"):
        LQFModel.from_timm(network, num_classes=3, config=LQFConfig(head_init="pretrained"))


def test_linearize_spec_that_matches_nothing():
    network, _ = pretrained_network("timm-resnet")
    with pytest.raises(ValueError, match="prefix 'layer9' matches no parameter of ResNet"):
        LQFModel.from_timm(network, num_classes=3, config=LQFConfig(linearize=["layer4", "layer9"]))
    network, _ = pretrained_network("timm-resnet")
    with pytest.raises(ValueError, match="'last:10' but ResNet has 4 blocks"):
        LQFModel.from_timm(network, num_classes=3, config=LQFConfig(linearize="last:10"))


@pytest.mark.parametrize(
    "make_input, error, message",
    [
        (lambda x: x[0], ValueError, "must have shape \\[batch, 3, height, width\\], got \\[3, 64, 64\\]"),
        (lambda x: x[:, :1], ValueError, "got \\[3, 1, 64, 64\\].*grayscale"),
        (lambda x: (x * 255).to(torch.uint8), TypeError, "must be a float tensor"),
        (lambda x: x.index_fill(2, torch.tensor([5]), float("nan")), ValueError, "contain NaN or Inf"),
        (lambda x: x.numpy(), TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_pixel_values(make_input, error, message):
    model, x = build("timm-resnet", dtype=torch.float32)
    with pytest.raises(error, match=message):
        model(make_input(x))


def test_fixed_size_backbone_rejects_other_sizes():
    model, x = build("timm-vit", dtype=torch.float32)
    with pytest.raises(ValueError, match="needs 32x32 inputs, got 48x48"):
        model(torch.nn.functional.interpolate(x, size=48))


@pytest.mark.parametrize("size, message", [(0, "must be an int >= 16 pixels, got 0"), ("64", "got '64'"),
                                           (True, "got True")])
def test_image_size_is_checked(size, message):
    model, _ = build("timm-resnet", dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        model.set_image_size(size)
    assert model.data_config["input_size"] == [3, 160, 160]  # unchanged


def test_an_image_size_the_backbone_cannot_run_at_is_refused_before_use():
    model, _ = build("timm-convnext", dtype=torch.float32)  # 32x downsampling, then a 2x2 kernel: 20 px is too few
    with pytest.raises(ValueError, match=r"This backbone cannot run at 20x20 pixels \(Calculated padded input size"):
        model.set_image_size(20)
    assert model.data_config["input_size"][-1] != 20


def test_exactly_one_input():
    model, x = build("timm-resnet", dtype=torch.float32)
    with pytest.raises(ValueError, match="exactly one of `pixel_values` and `trunk_output`"):
        model(x, trunk_output=model.encode_trunk(x))


def test_no_warnings_building_a_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build("timm-efficientnet")
