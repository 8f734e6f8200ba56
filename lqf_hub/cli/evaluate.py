"""``lqf-hub eval``."""

import argparse
from typing import Any

from .common import CLIError, checkpoint_source, data_arguments, model_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub eval``'s options."""
    evaluate = commands.add_parser("eval", help="Accuracy of an LQF checkpoint on a dataset split.")
    model_arguments(evaluate, None, "LQF checkpoint: directory (e.g. lqf-output) or Hub repo id.")
    data_arguments(evaluate)
    evaluate.add_argument("--split", default="test", help="Default: test.")
    evaluate.add_argument("--batch-size", type=int, default=64, help="Default: 64.")
    evaluate.add_argument("--format", default="table", choices=["table", "json"], help="Default: table.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..data import class_names, load_image_dataset, with_transform
    from ..modeling.model import LQFModel
    from ..training.objective import evaluate_dataset

    checkpoint = checkpoint_source(args.model, args.revision, args.token) or args.model
    model = LQFModel.from_pretrained(checkpoint, revision=args.revision, token=args.token)
    data = load_image_dataset(args.dataset, args.split, image_column=args.image_column, label_column=args.label_column)
    names, known = class_names(data), [model.config.id2label[i] for i in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise CLIError(f"{args.dataset} has {len(names)} classes but the model has {model.num_classes}.")
    if names != known and known != [str(i) for i in range(len(known))]:  # a model without class names says nothing
        raise CLIError(f"{args.dataset}'s classes ({_first(names)}) are not the model's ({_first(known)}) in that order: "
                       "its labels would be scored against the wrong classes. Evaluate on the dataset the model was "
                       "trained for, or one with the same classes in the same order.")
    metrics = evaluate_dataset(model, with_transform(data, model.data_config), batch_size=args.batch_size)
    return {"model": args.model, "dataset": args.dataset, "split": args.split, "samples": len(data), **metrics}


def _first(names: list[str], count: int = 4) -> str:
    return ", ".join(names[:count]) + (", …" if len(names) > count else "")
