"""Tiny models of every supported family, built without downloads; the default job scaled to seconds."""

import copy
from pathlib import Path

import pytest
import timm
import torch
from transformers import AutoModelForImageClassification, ConvNextConfig, ResNetConfig, SwinConfig, ViTConfig

from lqf_hub import LQFConfig, LQFModel
from lqf_hub.cli import main

# The default job, scaled to seconds: same model and pipeline, fewer images, smaller inputs.
TINY = ["--dataset", "mnist-5k", "--shots", "4", "--eval-per-class", "3", "--image-size", "32", "--epochs", "2",
        "--batch-size", "8", "--linearize", "bn2"]

# family -> (timm name, input size); the first six have a stem/blocks/neck plan, the last runs whole
TIMM_FAMILIES = {
    "timm-resnet": ("test_resnet", 64),
    "timm-efficientnet": ("test_efficientnet", 64),
    "timm-convnext": ("test_convnext", 64),
    "timm-vit": ("test_vit", 32),
    "timm-regnet": ("regnetx_002", 64),
    "timm-mobilenetv3": ("mobilenetv3_small_050", 64),
    "timm-byobnet": ("test_byobnet", 64),
}

HF_CONFIGS = {
    "hf-vit": lambda: ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=7,
    ),
    "hf-resnet": lambda: ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], num_labels=7),
    "hf-convnext": lambda: ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 2], num_labels=7),
    "hf-swin": lambda: SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=7
    ),
}
HF_SIZE = 32
FAMILIES = [*TIMM_FAMILIES, *HF_CONFIGS]
RELU_FAMILIES = ["timm-resnet", "timm-efficientnet", "timm-regnet", "timm-mobilenetv3", "timm-byobnet", "hf-resnet"]


def pretrained_network(family: str, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """A seeded random classifier of ``family`` (classifier included) that looks trained, and its input size.

    Fresh inits zero the last norm of each residual block, which makes blocks pass values through
    leaky-ReLU repeatedly until they sit at 1e-10 from a kink; trained networks have no such zeros.
    """
    torch.manual_seed(seed)
    if family in TIMM_FAMILIES:
        name, size = TIMM_FAMILIES[family]
        extra = {"img_size": size} if "vit" in family else {}
        network = timm.create_model(name, pretrained=False, num_classes=7, **extra)
    else:
        network, size = AutoModelForImageClassification.from_config(HF_CONFIGS[family]()), HF_SIZE
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
                if getattr(module, "running_var", None) is not None:
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 2.0)
    return network.eval(), size


def build(family: str, dtype: torch.dtype = torch.float64, seed: int = 0, **config) -> tuple[LQFModel, torch.Tensor]:
    """An LQFModel of ``family`` (δ random, so the linear term is not trivially zero) and an input batch."""
    network, size = pretrained_network(family, seed)
    config = LQFConfig(**config)
    if family in TIMM_FAMILIES:
        model = LQFModel.from_timm(network, num_classes=5, config=config)
    else:
        model = LQFModel.from_transformers(network, num_classes=5, config=config)
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for delta in model.delta.values():
            delta.copy_(1e-2 * torch.randn(delta.shape, generator=generator, dtype=dtype))
    x = torch.randn(3, 3, size, size, generator=generator, dtype=dtype)
    return model, x


@pytest.fixture
def float64():
    """float64 as the default dtype for one test, without leaking it into other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def original_copy(network: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(network).eval()


from hub_server import fake_hub  # noqa: E402,F401  (a running fake Hugging Face Hub, as a fixture)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """The output directory of ``lqf-hub train`` on ``TINY`` (read-only for the tests that share it)."""
    output = tmp_path_factory.mktemp("cli") / "lqf-output"
    assert main(["train", *TINY, "--output-dir", str(output)]) == 0
    return output
