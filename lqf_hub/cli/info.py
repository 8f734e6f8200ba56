"""``lqf-hub info``."""

import argparse
from typing import Any

from .common import checkpoint_source, model_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub info``'s options."""
    info = commands.add_parser("info", help="Show a checkpoint's config and sizes; check its base.")
    model_arguments(info, "lqf-output", "Checkpoint directory or Hub repo id. Default: lqf-output")
    info.add_argument("--base", default=None, help="A timm name or HF repo id: does the checkpoint's w0 match it?")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..hub import WEIGHTS_FILE, backbone_sha256, read_config, resolve_files

    source = checkpoint_source(args.model, args.revision, args.token) or args.model
    config_file, weights_file = resolve_files(source, revision=args.revision, token=args.token)
    saved, config = read_config(config_file)
    info = {
        "checkpoint": str(source), "base": saved["base"], "backbone": config.backbone_name, "linearize": config.linearize,
        "activation": config.activation, "num_classes": config.num_classes, "dtype": saved["dtype"],
        "base_weights": config.backbone.source.to_dict(), "base_sha256": saved["base_sha256"],
        "file_bytes": {WEIGHTS_FILE: weights_file.stat().st_size}, "training": saved.get("training") or {},
    }
    if args.base:
        from ..adapters import backbone_from_name

        found = backbone_sha256(backbone_from_name(args.base, token=args.token).network.state_dict())
        info["base_matches"] = found == saved["base_sha256"]
        info["given_base_sha256"] = found
    return info
