"""Transfer benchmark: LQF against a linear probe and ordinary fine-tuning, same backbone, same data.

Every run: ImageNet tf_efficientnet_lite0 (embedded weights), a stratified few-shot training set, a
stratified test subset, one seed. Methods:
  probe   logistic regression on the frozen pre-logit features (L-BFGS)
  lqf     the linearized model trained with lqf-hub's trainer (``--grid method=solve,sgd``: the certified
          optimum with λ chosen on held-out training images, or the early-stopped K-FAC SGD loop)
  ft      ordinary fine-tuning of every weight (SGD, cross-entropy)
``--grid key=v1,v2 ...`` runs LQF over the product of LQFConfig / LQFTrainingArguments values.

    python benchmarks/transfer.py --dataset fashion-mnist --shots 100 --methods probe lqf ft
    python benchmarks/transfer.py --dataset mnist-5k --shots 10 100 --methods lqf \\
        --grid activation=tangent,leaky,none linearize=last:1,last:2,last:3
"""

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

from lqf_hub import LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments, TrainingDiverged
from lqf_hub.compare.baselines import accuracy, fine_tune, probe_scores
from lqf_hub.data import load_image_dataset, sample_shots, with_transform

CONFIG_FIELDS = {f.name for f in dataclasses.fields(LQFConfig)}
TRAINING_FIELDS = {f.name for f in dataclasses.fields(LQFTrainingArguments)}


def _value(key: str, text: str):
    if key in ("activation", "linearize", "head_init", "loss", "preconditioner", "kfac_outputs", "method", "prior"):
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"auto": None, "true": True, "false": False}.get(text.lower(), text)


def _grid(specs: list[str]) -> list[dict]:
    keys, values = [], []
    for spec in specs:
        key, _, options = spec.partition("=")
        if key not in CONFIG_FIELDS | TRAINING_FIELDS:
            raise SystemExit(f"--grid key {key!r} is neither an LQFConfig nor a LQFTrainingArguments field")
        keys.append(key)
        values.append([_value(key, v) for v in options.split(",")])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def run_lqf(settings: dict, train, test, num_classes: int, args) -> dict:
    config = LQFConfig(**{k: v for k, v in settings.items() if k in CONFIG_FIELDS})
    model = LQFModel.from_timm(args.backbone, num_classes, config)
    model.set_image_size(args.image_size)
    with tempfile.TemporaryDirectory() as out:
        training = LQFTrainingArguments(
            output_dir=out, epochs=args.epochs, batch_size=args.batch_size, progress=False, eval_every=args.epochs,
            save_every=args.epochs,
            **{k: v for k, v in settings.items() if k in TRAINING_FIELDS},
        )
        trainer = LQFTrainer(model, with_transform(train, model.data_config),
                             with_transform(test, model.data_config), training)
        started = time.perf_counter()
        try:
            history = trainer.train()
        except TrainingDiverged as err:
            return {"accuracy": float("nan"), "note": str(err).split(".")[0]}
        final = history[-1]
        result = {
            "accuracy": final["eval_accuracy"], "seconds": time.perf_counter() - started,
            "train_loss": final["train_loss"], "trainer": trainer, "ridge": model.config.ridge,
            "settings": {"method": training.method, "activation": config.activation, "linearize": config.linearize,
                         "damping": training.damping},  # the effective values, defaults included
        }
        solver = ("relative_gradient_norm", "suboptimality_bound", "iterations", "path_iterations")
        result.update({k: final[k] for k in (solver if training.method == "solve" else ("learning_rate",))})
        return result


def run_probe(trainer: LQFTrainer | None, train, test, num_classes: int, args) -> dict:
    """Probe on the pre-logit features; reuses an LQF trainer's cached trunk outputs when given."""
    started = time.perf_counter()
    if trainer is None:
        model = LQFModel.from_timm(args.backbone, num_classes, LQFConfig(linearize="head"))
        model.set_image_size(args.image_size)
        trainer = LQFTrainer(model, with_transform(train, model.data_config), with_transform(test, model.data_config),
                             LQFTrainingArguments(output_dir=tempfile.mkdtemp(), progress=False))
    acc = probe_scores(trainer.features("train"), trainer.features("eval"), num_classes)["accuracy"]
    return {"accuracy": acc, "seconds": time.perf_counter() - started}


def run_ft(train, test, num_classes: int, args) -> dict:
    from lqf_hub.adapters.timm import timm_backbone

    backbone = timm_backbone(args.backbone)
    transform = {**backbone.data_config, "input_size": [3, args.image_size, args.image_size]}
    started = time.perf_counter()
    model = fine_tune(
        backbone.network, backbone.num_features, num_classes, with_transform(train, transform),
        epochs=args.ft_epochs, learning_rate=args.ft_lr, batch_size=args.ft_batch_size, progress=False,
    )
    acc = accuracy(model, with_transform(test, transform))
    return {"accuracy": acc, "seconds": time.perf_counter() - started}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--shots", type=int, nargs="+", default=[100])
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["probe", "lqf", "ft"], choices=["probe", "lqf", "ft"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--ft-lr", type=float, default=0.01)
    parser.add_argument("--ft-batch-size", type=int, default=32)
    parser.add_argument("--grid", nargs="*", default=[], help="LQF settings to sweep: key=v1,v2 ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append results (JSON lines) to this file")
    args = parser.parse_args(argv)

    common = {"image_size": args.image_size, "test_per_class": args.test_per_class, "seed": args.seed,
              "epochs": args.epochs, "batch_size": args.batch_size, "backbone": args.backbone}

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**row, **common}) + "\n")

    rows: list[dict] = []
    test_full = load_image_dataset(args.dataset, "test")
    test = sample_shots(test_full, args.test_per_class, seed=1000 + args.seed)
    train_full = load_image_dataset(args.dataset, "train")
    num_classes = len(train_full.features["label"].names)
    for shots in args.shots:
        train = sample_shots(train_full, shots, seed=args.seed)
        trainer = None
        for settings in _grid(args.grid) if "lqf" in args.methods else []:
            result = run_lqf(settings, train, test, num_classes, args)
            trainer = result.pop("trainer", trainer)
            record({"dataset": args.dataset, "shots": shots, "method": "lqf", **result})
        if "probe" in args.methods:
            record({"dataset": args.dataset, "shots": shots, "method": "probe", "settings": {},
                    **run_probe(trainer, train, test, num_classes, args)})
        if "ft" in args.methods:
            record({"dataset": args.dataset, "shots": shots, "method": "ft",
                    "settings": {"lr": args.ft_lr, "epochs": args.ft_epochs}, **run_ft(train, test, num_classes, args)})
    print("\n| dataset | shots | method | settings | test acc (%) | seconds |\n|---|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['shots']} | {r['method']} | {json.dumps(r['settings'])} | "
              f"{100 * r['accuracy']:.2f} | {r.get('seconds', float('nan')):.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
