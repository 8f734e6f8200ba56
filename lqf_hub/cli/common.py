"""What the commands share: one-line errors, the model and data options, finding a checkpoint, the output
directory's guard, the dataclass options."""

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

OUTPUT_MARKER = ".lqf-output"
DEFAULT_MODEL = "tf_efficientnet_lite0"
DEFAULT_IMAGE_SIZE = 128


class CLIError(Exception):
    """A user error: printed as one line."""


def add_dataclass_options(
    parser, cls, prefix: str, *, exclude: set[str] = frozenset(), rename: dict[str, str] | None = None
) -> None:
    """One option per field of the dataclass ``cls`` (but ``exclude``: those the command fills itself), with the
    field's help, choices and default; ``--field-name`` unless ``rename`` gives another. Options left unset
    stay None, so the dataclass applies its own default."""
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _option_type(f.type)
        option = (rename or {}).get(f.name, f.name.replace("_", "-"))
        text = f.metadata.get("help", "") + ("" if default is None else f" Default: {default}.")
        if kind is bool:
            parser.add_argument(f"--{option}", dest=prefix + f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
            continue
        choices = [c.value for c in f.metadata["choices"]] if "choices" in f.metadata else None
        parser.add_argument(f"--{option}", dest=prefix + f.name, type=kind, choices=choices, default=None, help=text,
                            metavar=None if choices else option.replace("-", "_").upper(),
                            nargs="+" if typing.get_origin(f.type) is list else None)


def _option_type(annotation) -> type:
    """The command-line type of a field (of its items for a list): its own, or the first of ``X | None``;
    str for anything textual."""
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(annotation) is list:
        kinds = list(typing.get_args(annotation))
    return kinds[0] if kinds[0] in (bool, int, float) else str


def dataclass_values(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The options of one dataclass that were given on the command line, by field name."""
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def image_size_option(text: str) -> int:
    from ..config import MIN_IMAGE_SIZE

    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, got {text!r}") from None
    if size < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_IMAGE_SIZE} pixels, got {size}")
    return size


def model_arguments(parser, default: str | None, help_text: str) -> None:
    parser.add_argument("--model", default=default, required=default is None, help=help_text)
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument("--token", default=None, help="Hub token (private repos).")


def data_arguments(parser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist, mnist-5k, an imagefolder or save_to_disk directory, or a Hub dataset id.")
    parser.add_argument("--image-column", default=None, help="Image column (default: detected).")
    parser.add_argument("--label-column", default=None, help="Label column (default: detected).")


def build_model(args, num_classes: int, id2label: dict[int, str]):
    from ..config import LQFConfig, linearize_from_text
    from ..modeling.model import LQFModel

    overrides = dataclass_values(args, "config.")
    if "linearize" in overrides:
        overrides["linearize"] = linearize_from_text(overrides["linearize"])
    checkpoint = checkpoint_source(args.model, args.revision, args.token)
    if checkpoint is not None:  # continue from an LQF checkpoint: its config, δ and head
        if overrides or args.weights:
            given = [*(f"--{k.replace('_', '-')}" for k in overrides), *(["--weights"] if args.weights else [])]
            raise CLIError(f"--model {args.model} is an LQF checkpoint; its settings cannot be changed ({', '.join(given)}).")
        model = LQFModel.from_pretrained(checkpoint, revision=args.revision, token=args.token)
        if model.num_classes != num_classes:
            raise CLIError(f"{args.model} has {model.num_classes} classes but {args.dataset} has {num_classes}.")
        return model
    config = LQFConfig(**overrides, id2label=id2label)
    if args.weights:
        if not Path(args.weights).is_file():
            raise CLIError(f"--weights {args.weights} does not exist.")
        return LQFModel.from_timm(args.model, num_classes, config, checkpoint_path=args.weights)
    return model_from_name(args, config, num_classes)


def model_from_name(args, config, num_classes: int | None = None):
    """``args.model`` as a base model: a timm name or a Hugging Face repo id (the adapters' name rule)."""
    from ..adapters import backbone_from_name
    from ..modeling.model import LQFModel

    backbone = backbone_from_name(args.model, revision=args.revision, token=args.token)
    return LQFModel.from_backbone(backbone, num_classes, config)


def checkpoint_source(model: str, revision: str | None = None, token: str | None = None) -> str | None:
    """``model`` as an LQF checkpoint (directory, ``OUTPUT/model``, or Hub repo with an lqf config), else None."""
    from ..hub import CONFIG_FILE, check_exists_or_repo_id, locate_checkpoint

    check_exists_or_repo_id(model)
    found = locate_checkpoint(model, revision=revision, token=token)
    path = Path(model)
    if found is None and path.exists() and not (path / CONFIG_FILE).is_file():  # a local HF model has a config
        raise CLIError(f"{model} is neither an LQF checkpoint directory nor a model name.")
    return found


def check_output_dir(output: Path, overwrite: bool, resume_from: str | None) -> None:
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output-dir {output} is a file.")
    if output.is_dir() and any(output.iterdir()) and not (output / OUTPUT_MARKER).exists() and not overwrite:
        raise CLIError(f"--output-dir {output} exists and was not written by lqf-hub; choose another or pass --overwrite.")
    if resume_from and not Path(resume_from).is_dir():
        raise CLIError(f"--resume-from {resume_from} does not exist.")


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.exists():
            files.append(path)
        else:
            raise CLIError(f"{item} does not exist.")
    return files


def read_rgb(path: Path):
    """The image file ``path`` as an RGB ``PIL.Image``, or ``CLIError`` saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CLIError(f"cannot read {path}: {err}") from err


def print_table(record: dict[str, Any]) -> None:
    width = max(len(k) for k in record)
    for key, value in record.items():
        value = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {value}")
