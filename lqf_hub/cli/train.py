"""``lqf-hub train``."""

import argparse
import json
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MODEL,
    OUTPUT_MARKER,
    CLIError,
    add_dataclass_options,
    build_model,
    check_output_dir,
    data_arguments,
    dataclass_values,
    image_size_option,
    model_arguments,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub train``'s options."""
    train = commands.add_parser("train", help="Fine-tune with LQF (offline default: EfficientNet-Lite0 on Fashion-MNIST).")
    model_arguments(train, DEFAULT_MODEL, "Base model: a timm name, a Hugging Face repo id, or an LQF checkpoint "
                     "to train further.")
    train.add_argument("--weights", default=None, metavar="FILE",
                       help="Base weights for a timm --model: a .safetensors state dict or a legacy EfficientNet-Lite .pth.")
    data_arguments(train)
    train.add_argument("--train-split", default="train", help="Split to train on. Default: train.")
    train.add_argument("--shots", type=int, default=100,
                       help="Training images per class, drawn with --seed (0: all; 1 needs a fixed --prior and "
                            "--ridge-grid value: nothing is left to cross-validate on). Default: 100.")
    train.add_argument("--eval-split", default="test",
                       help="Split to evaluate on; if the dataset has none, --val-fraction of the training split. Default: test.")
    train.add_argument("--val-fraction", type=float, default=0.2,
                       help="Held-out part of the training split when there is no eval split. Default: 0.2.")
    train.add_argument("--eval-per-class", type=int, default=200,
                       help="Evaluation images per class, a stratified subset for speed (0: the whole split). Default: 200.")
    train.add_argument("--image-size", type=image_size_option, default=None,
                       help=f"Input resolution. Default: 128 for {DEFAULT_MODEL} (sized for CPUs), else the model's own.")
    train.add_argument("--augment", action="store_true",
                       help="Random-crop/flip augmentation (images are then decoded every step: no trunk cache).")
    train.add_argument("--overwrite", action="store_true", help="Allow writing into a directory that is not an lqf output.")
    train.add_argument("--no-probe", action="store_true", help="Skip the linear-probe comparison.")
    from ..config import LQFConfig
    from ..training.arguments import LQFTrainingArguments

    add_dataclass_options(train.add_argument_group("LQF (LQFConfig)"), LQFConfig, "config.",
                          exclude={"num_classes", "id2label", "backbone", "temperature"}, rename={"seed": "head-seed"})
    add_dataclass_options(train.add_argument_group("training (LQFTrainingArguments)"), LQFTrainingArguments,
                          "training.", exclude={"dataset_name", "eval_split_name", "hub_token"})


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..compare.baselines import probe_scores
    from ..data import MissingSplit, class_names, load_image_dataset, sample_shots, split_validation, with_transform
    from ..files import atomic_write_text
    from ..training.arguments import LQFTrainingArguments
    from ..training.trainer import LQFTrainer, peak_memory, process_state

    values = dataclass_values(args, "training.")
    if args.augment and values.get("cache_trunk"):
        raise CLIError("--augment changes the images every epoch, so the trunk cannot be cached; drop --cache-trunk.")
    if args.augment and values.get("method", LQFTrainingArguments.method) == "solve":
        raise CLIError("--augment needs --method sgd: the solver works on the frozen trunk's cached outputs.")
    training = LQFTrainingArguments(**{**values, "cache_trunk": False} if args.augment else values,
                                    dataset_name=args.dataset, hub_token=args.token)
    state = process_state()
    output = Path(training.output_dir)
    check_output_dir(output, args.overwrite, training.resume_from)
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
    model = build_model(args, len(names), {i: n for i, n in enumerate(names)})
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
              "test_loss": final["eval_loss"], **{f"test_{k}": final[f"eval_{k}"] for k in ("nll", "ece", "brier")}}
    solved = ("prior", "ridge", "relative_gradient_norm", "suboptimality_bound", "iterations", "path_iterations",
              "path_products", "dropped_priors", "selection_passes", "passes", "temperature", "seconds", "stage_seconds")
    result.update({k: final[k] for k in (solved if "ridge" in final else ("epoch", "learning_rate"))})
    if not args.no_probe:
        probe = probe_scores(trainer.features("train"), trainer.features("eval"), len(names))
        result.update({f"probe_{k}": v for k, v in probe.items()})
    result.update(peak_memory())  # the whole command's, probe included
    if state.is_main_process:  # every candidate's path in the file, not on the terminal
        selection = {"selection": model.training_summary.get("selection", [])} if "ridge" in final else {}
        atomic_write_text(output / "metrics.json", json.dumps({**result, **selection}, indent=2))
    state.wait_for_everyone()
    return result
