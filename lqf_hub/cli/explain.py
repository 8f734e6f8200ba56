"""``lqf-hub explain``."""

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from .common import CLIError, checkpoint_source, image_files, model_arguments, read_rgb


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub explain``'s options."""
    explain = commands.add_parser(
        "explain", help="Split predictions exactly over the training images (needs a model from `lqf-hub train`).")
    model_arguments(explain, "lqf-output/model", "LQF checkpoint. Default: lqf-output/model")
    explain.add_argument("images", nargs="*", help="Image files or folders of images.")
    explain.add_argument("--top-k", type=int, default=5, help="Supporting and opposing training images shown, or with "
                         "--training-set the suspects shown (at least 16). Default: 5.")
    explain.add_argument("--training-set", action="store_true",
                         help="Rank the training images by how much the rest argues against their label (exact "
                              "leave-one-out): training_set.json and suspects.png.")
    explain.add_argument("--projections", type=int, default=None,
                         help="Fast mode for large training sets: the kernel estimated from this many random projections "
                              "of the training images' gradients (k passes over them, once) instead of the exact one "
                              "(C passes per image, N·C for --training-set). Its error shrinks as 1/sqrt(k): read "
                              "'unexplained' (its error in the sum) and heed a saturation warning. Default: exact.")
    explain.add_argument("--output-dir", default="explain-output",
                         help="JSON and one PNG per image. Default: explain-output.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..analysis.explain import Explainer, training_trunk
    from ..modeling.model import LQFModel

    if not args.images and not args.training_set:
        raise CLIError("Nothing to explain: name image files or folders, or pass --training-set.")
    pictures = _read_images(image_files(args.images), args.training_set)  # before the training set's passes
    model = LQFModel.from_pretrained(checkpoint_source(args.model, args.revision, args.token) or args.model,
                                     revision=args.revision, token=args.token)
    output = Path(args.output_dir)
    raw, trunk = training_trunk(model, output, progress=True)  # kept there: explains without the images later
    explainer = Explainer.from_model(model, trunk)
    features = None if args.projections is None else explainer.random_features(
        args.projections, progress=True, cache_dir=output)  # once per model: kept in the output directory
    result = {"training_images": explainer.data.count, "ridge": model.config.ridge,
              "kernel": _kernel_name(features)}
    if pictures:
        result.update(_explain_images(model, explainer, features, raw, pictures, args.top_k, output))
    if args.training_set:
        result.update(_explain_training_set(explainer, features, raw, max(args.top_k, 16), output))
    return result


def _read_images(files: list[Path], training_set: bool) -> list[tuple[Path, Any]]:
    """The named images as ``(path, RGB PIL image)``; an unreadable one is skipped with a warning, unless none can
    be read and there is nothing else to do (``training_set`` False): then ``CLIError``, before any pass."""
    pictures, unreadable = [], []
    for path in files:
        try:
            pictures.append((path, read_rgb(path)))
        except CLIError as err:
            unreadable.append(str(err))
    if unreadable and not pictures and not training_set:
        raise CLIError(f"None of the images can be read ({'; '.join(unreadable[:3])}"
                       f"{'; …' if len(unreadable) > 3 else ''}): name image files, or folders of them.")
    for message in unreadable:
        warnings.warn(f"{message}; skipped.", stacklevel=2)
    return pictures


def _picture(raw, index: int):
    """Training image ``index``, or None where the training images are not reachable."""
    from ..data import pil_image

    return None if raw is None else pil_image(raw, index)


def _kernel_name(features) -> str:
    return "exact" if features is None else f"{features.train.shape[-1]} random projections (seed {features.seed})"


def _explain_images(model, explainer, features, raw, pictures: list[tuple[Path, Any]], top_k: int,
                    output: Path) -> dict[str, Any]:
    """Each image's prediction split over the training images: explanations.json and one PNG per image."""
    from ..analysis.explain import plot_explanation
    from ..data import image_transform
    from ..files import atomic_write_text

    transform = image_transform(model.data_config)
    rows = []
    for path, picture in pictures:
        explanation = explainer.explain(model.encode_trunk(transform(picture).unsqueeze(0)), features=features,
                                        only_predicted=True)  # what the JSON and PNG show: one pass, not C
        row = {"image": str(path), "kernel": _kernel_name(features),
               **explanation.summary(top_k, model.config.id2label, explainer.data.labels)}
        rows.append(row)
        shown = [item["train_index"] for kind in ("supporting", "opposing") for item in row[kind]]
        plot_explanation(picture, row, [_picture(raw, i) for i in shown], output / f"{path.stem}.png")
    atomic_write_text(output / "explanations.json", json.dumps(rows, indent=2))
    return {"images": len(rows), "json": str(output / "explanations.json")}


def _explain_training_set(explainer, features, raw, shown: int, output: Path) -> dict[str, Any]:
    """The training images ranked by their leave-one-out label margin (lowest first): training_set.json and
    suspects.png."""
    from ..analysis.explain import plot_suspects, save_ranking

    rows = explainer.disputed_labels(features, progress=True)
    path = save_ranking(output, explainer.model, _kernel_name(features), rows)
    plot_suspects(rows[:shown], [_picture(raw, row["train_index"]) for row in rows[:shown]], output / "suspects.png")
    return {"disputed_labels": sum(row["margin"] < 0 for row in rows), "ranking": str(path)}
