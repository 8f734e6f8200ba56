"""``lqf-hub forget``."""

import argparse
from pathlib import Path
from typing import Any

from .common import OUTPUT_MARKER, CLIError, check_output_dir, checkpoint_source, model_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub forget``'s options."""
    forget = commands.add_parser(
        "forget", help="The model without some training images: the certified optimum on the rest (same λ).")
    model_arguments(forget, "lqf-output/model", "LQF checkpoint. Default: lqf-output/model")
    forget.add_argument("--remove", type=int, nargs="+", required=True,
                        help="Positions of the training images to forget, as `lqf-hub explain` reports them.")
    forget.add_argument("--output-dir", default="forget-output", help="Where the new model goes (model/). Default: forget-output.")
    forget.add_argument("--overwrite", action="store_true", help="Allow writing into a directory that is not an lqf output.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..analysis.explain import training_images
    from ..analysis.forget import forget
    from ..modeling.model import LQFModel
    from ..training.arguments import LQFTrainingArguments

    model = LQFModel.from_pretrained(checkpoint_source(args.model, args.revision, args.token) or args.model,
                                     revision=args.revision, token=args.token)
    if "forgotten" in (model.training_summary or {}):
        raise CLIError("This model has already forgotten images; forget from the original model, with every index "
                       "to remove at once (indices of its training set, as `lqf-hub explain` of it reports them).")
    output = Path(args.output_dir)
    check_output_dir(output, args.overwrite, None)
    _, images = training_images(model)
    output.mkdir(parents=True, exist_ok=True)
    (output / OUTPUT_MARKER).write_text("written by lqf-hub forget\n")
    new, record = forget(model, images, args.remove, LQFTrainingArguments(output_dir=str(output)))
    return {"model": str(output / "model"), "removed": len(new.training_summary["forgotten"]["removed"]),
            "train_samples": new.training_summary["train_samples"], "ridge": record["ridge"],
            "relative_gradient_norm": record["relative_gradient_norm"],
            "suboptimality_bound": record["suboptimality_bound"], "iterations": record["iterations"],
            "seconds": new.training_summary["forgotten"]["seconds"]}
