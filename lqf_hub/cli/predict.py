"""``lqf-hub predict``."""

import argparse
from typing import Any

from .common import CLIError, checkpoint_source, image_files, model_arguments, model_from_name, read_rgb


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub predict``'s options."""
    predict = commands.add_parser("predict", help="Classify image files or folders (calibrated probabilities).")
    model_arguments(predict, None, "LQF checkpoint, or a timm name / HF repo id (its own ImageNet classes).")
    predict.add_argument("images", nargs="+", help="Image files or folders of images.")
    predict.add_argument("--top-k", type=int, default=3, help="Classes per image. Default: 3.")
    predict.add_argument("--format", default="table", choices=["table", "json"], help="Default: table.")


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    from ..config import LQFConfig
    from ..data import image_transform
    from ..modeling.model import LQFModel

    checkpoint = checkpoint_source(args.model, args.revision, args.token)
    if checkpoint is not None:
        model = LQFModel.from_pretrained(checkpoint, revision=args.revision, token=args.token)
    else:  # a base model with its own classifier (e.g. the ImageNet classes)
        model = model_from_name(args, LQFConfig(linearize="head", head_init="pretrained"))
    transform = image_transform(model.data_config)
    rows, errors = [], []
    for path in image_files(args.images):
        try:
            pixels = transform(read_rgb(path)).unsqueeze(0)
        except CLIError as err:
            errors.append(str(err))
            continue
        probs = model.predict_proba(pixels)[0]  # softmax(f / T), T fitted on the solver's out-of-fold predictions
        std = model.predict_uncertainty(pixels)[0] if model.posterior is not None else None
        top = probs.topk(min(args.top_k, model.num_classes))
        predictions = [{"label": model.config.id2label[int(i)], "score": round(float(p), 4)}
                       for p, i in zip(top.values, top.indices)]
        if std is not None:  # the posterior predictive's standard deviation of each output (targets: α·one-hot)
            for prediction, i in zip(predictions, top.indices):
                prediction["output_std"] = round(float(std[i]), 4)
        rows.append({"image": str(path), "predictions": predictions})
    return rows, errors
