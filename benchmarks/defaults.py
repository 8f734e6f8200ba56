"""The validation suite: lqf-hub's defaults chosen on validation data only, over tasks, backbones, shots, seeds.

For every task, backbone, shot count and seed the training images are drawn as `lqf-hub train` draws them
and every variant (settings of ``LQFConfig``, the image size) is scored by the solver's own choice
(`LQFTrainer.select`): 5-fold cross-validation over the training images on Krylov paths, the priors raced
(K-FAC, isotropic and LQF-head), λ by the one-standard-error rule. ``run`` never reads a test image.
``test`` evaluates the chosen defaults once per draw on the task's test split, beside LQF-head and a linear
probe (the report, not a choice). The commands of the committed results (``benchmarks/results/defaults/``;
EfficientNet-Lite0 only, and the variants on one seed: what 2 cores gave in one session, 2026-12-07):

    python benchmarks/defaults.py run --models tf_efficientnet_lite0 --tasks fashion-mnist --shots 100 --seeds 0 \
        --variants linearize=last:1 linearize=last:2 linearize=last:1,head=lqf-head \
        --out benchmarks/results/defaults/validation.jsonl
    python benchmarks/defaults.py run --models tf_efficientnet_lite0 --tasks mnist-5k digits fashion-upper \
        --shots 100 --seeds 0 --variants linearize=last:1 linearize=last:2 \
        --out benchmarks/results/defaults/validation.jsonl
    python benchmarks/defaults.py summary benchmarks/results/defaults/validation.jsonl \
        --report benchmarks/results/defaults/validation.md
    python benchmarks/defaults.py test --models tf_efficientnet_lite0 --variant linearize=last:1 --shots 5 20 \
        --out benchmarks/results/defaults/test.jsonl
    python benchmarks/defaults.py test --models tf_efficientnet_lite0 --variant linearize=last:1 --shots 100 \
        --seeds 0 --out benchmarks/results/defaults/test-100shots.jsonl
    python benchmarks/defaults.py test --models tf_efficientnet_lite0 --variant linearize=last:1 --shots 100 \
        --seeds 1 2 --out benchmarks/results/defaults/test-100shots.jsonl   # stopped after seed 1's first 3 tasks
    python benchmarks/defaults.py test-summary benchmarks/results/defaults/test*.jsonl \
        --report benchmarks/results/defaults/test.md

The whole suite is the same commands with their defaults (five tasks, Lite0 and Lite1, 5 / 20 / 100 shots,
seeds 0 1 2): about a day on 2 cores.

Tasks, all from data that installs offline: ``fashion-mnist`` and ``mnist-5k`` (10 classes);
``fashion-upper``: Fashion-MNIST's four upper-body classes (T-shirt/top, Pullover, Coat, Shirt — the classes
it confuses most); ``digits``: scikit-learn's 1797 8×8 digits, upsampled by the backbone's transform (its
fixed 70/30 split); ``fashion-imbalanced``: Fashion-MNIST with class c drawn at ``shots · 0.75^c`` images
(a 1:8 imbalance over the ten classes), scored in balanced accuracy. A variant is ``key=value[,key=value]``
over ``linearize``, ``activation``, ``target_scale``, ``head_init``, ``image_size`` and ``head=lqf-head``
(w0's head moved to LQF-head's optimum first: LP-FT). Finished rows are skipped when ``--out`` already
holds them.
"""

import argparse
import json
import math
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np
import torch

from lqf_hub import LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.compare.baselines import linear_probe
from lqf_hub.data import class_names, label_array, load_image_dataset, sample_shots, with_transform
from lqf_hub.solver.solve import HeadPath

DEFAULT_IMAGE_SIZE = 128
CONFIG_KEYS = {"linearize", "activation", "target_scale", "head_init"}
UPPER_BODY = ["T-shirt/top", "Pullover", "Coat", "Shirt"]
IMBALANCE = 0.75  # class c gets shots · IMBALANCE^c images
PROBE_WEIGHT_DECAYS = [100.0, 10.0, 1.0, 0.1, 0.01, 0.001, 0.0001]  # strongest first: ties keep the strongest


# ------------------------------------------------------------------------------------------- tasks
def load_task(task: str, split: str) -> datasets.Dataset:
    """A task's split as a Hugging Face dataset with ``image`` and ``label`` columns."""
    if task in ("fashion-mnist", "mnist-5k", "fashion-imbalanced"):
        return load_image_dataset("mnist-5k" if task == "mnist-5k" else "fashion-mnist", split)
    if task == "fashion-upper":
        full = load_image_dataset("fashion-mnist", split)
        names = class_names(full)
        keep = [names.index(n) for n in UPPER_BODY]
        labels = label_array(full)
        rows = np.flatnonzero(np.isin(labels, keep))
        relabelled = [keep.index(label) for label in labels[rows]]
        subset = full.select(rows).remove_columns("label")
        return subset.add_column("label", relabelled).cast_column("label", datasets.ClassLabel(names=UPPER_BODY))
    if task == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images * (255 / 16)).round().astype(np.uint8)
        order = np.random.default_rng(0).permutation(len(images))
        cut = round(0.7 * len(images))
        rows = np.sort(order[:cut] if split == "train" else order[cut:])
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
        return datasets.Dataset.from_dict({"image": list(images[rows]), "label": digits.target[rows].tolist()},
                                          features=features)
    raise SystemExit(f"unknown task {task!r}")


def draw_training_images(task: str, shots: int, seed: int) -> datasets.Dataset:
    train = load_task(task, "train")
    if task != "fashion-imbalanced":
        return sample_shots(train, shots, seed=seed)
    labels, rng = label_array(train), np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(labels == c), max(1, round(shots * IMBALANCE**c)), replace=False)
            for c in range(len(class_names(train)))]
    return train.select(np.sort(np.concatenate(rows)))


def metric_name(task: str) -> str:
    return "balanced accuracy" if task == "fashion-imbalanced" else "accuracy"


# ------------------------------------------------------------------------------------- variants
def variant_settings(variant: str) -> tuple[dict, int, bool]:
    """``"key=value,key=value"`` -> (LQFConfig settings, image size, whether w0's head is LQF-head's optimum)."""
    config, size, fitted_head = {}, DEFAULT_IMAGE_SIZE, False
    for part in variant.split(","):
        key, _, value = part.partition("=")
        if key == "image_size":
            size = int(value)
        elif key == "head" and value == "lqf-head":
            fitted_head = True
        elif key in CONFIG_KEYS:
            config[key] = float(value) if key == "target_scale" else value
        else:
            raise SystemExit(f"variant {variant!r}: {key!r} is not one of {sorted(CONFIG_KEYS | {'image_size', 'head'})}")
    return config, size, fitted_head


def build(model_name: str, variant: str, num_classes: int) -> LQFModel:
    config, size, _ = variant_settings(variant)
    model = LQFModel.from_timm(model_name, num_classes, LQFConfig(**config))
    model.set_image_size(size)
    return model


def fit_head_to_lqf_head(trainer: LQFTrainer, seed: int) -> None:
    """Move w0's head to LQF-head's optimum on all the training images (LP-FT, Kumar et al. 2022), λ by its own
    cross-validation. The folds that score the model afterwards then use a head fitted to their held-out images
    too: a leak that can only flatter this variant (so a loss here is a loss)."""
    model = trainer.model
    head_only = LQFTrainer(model, trainer.inputs("train"), None,
                           LQFTrainingArguments(output_dir=trainer.args.output_dir, seed=seed, prior="head", progress=False))
    ridge = head_only.select().ridge
    delta = head_only.data_term().flat.unflatten(HeadPath(head_only.data_term()).solution(ridge))
    with torch.no_grad():
        model.net.head.weight += delta["head.weight"]
        model.net.head.bias += delta["head.bias"]


def score(task: str, model_name: str, shots: int, seed: int, variant: str) -> dict:
    """The solver's choice on one draw, and what it saw: every prior's path, products, seconds."""
    train = draw_training_images(task, shots, seed)
    model = build(model_name, variant, len(class_names(train)))
    with tempfile.TemporaryDirectory() as out:
        trainer = LQFTrainer(model, with_transform(train, model.data_config), None,
                             LQFTrainingArguments(output_dir=out, seed=seed, progress=False))
        started = time.perf_counter()
        trainer.inputs("train")
        cached = time.perf_counter()
        if variant_settings(variant)[2]:
            fit_head_to_lqf_head(trainer, seed)
            trainer = LQFTrainer(model, trainer.inputs("train"), None, trainer.args)
        selection = trainer.select()
        finished = time.perf_counter()
    return {"task": task, "model": model_name, "shots": shots, "seed": seed, "variant": variant,
            "images": len(train), "chosen_prior": selection.prior, "chosen_ridge": selection.ridge,
            "products": selection.products, "dropped": selection.dropped, "cache_seconds": cached - started,
            "select_seconds": finished - cached,
            "paths": {kind: [vars(p) for p in points] for kind, points in selection.paths.items()}}


def run(args) -> None:
    done = set()
    if args.out.exists():
        done = {(r["task"], r["model"], r["shots"], r["seed"], r["variant"]) for r in map(json.loads, args.out.open())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for shots in args.shots:  # cheapest first: every task and backbone gets its few-shot rows early
        for model_name in args.models:
            for seed in args.seeds:
                for task in args.tasks:
                    for variant in args.variants:
                        if (task, model_name, shots, seed, variant) in done:
                            continue
                        row = score(task, model_name, shots, seed, variant)
                        print(json.dumps({k: v for k, v in row.items() if k != "paths"}), flush=True)
                        with args.out.open("a") as f:
                            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------- test
def test_images(task: str, per_class: int) -> datasets.Dataset:
    """The task's test split, ``per_class`` images of every class (seed 1000; balanced, so accuracy is also
    the balanced accuracy)."""
    return sample_shots(load_task(task, "test"), per_class, seed=1000, at_most=True)


def evaluate_draw(task: str, model_name: str, shots: int, seed: int, variant: str, per_class: int) -> dict:
    """The defaults (``variant``), LQF-head and a linear probe trained on one draw, each read once on the test
    images: accuracy %, and seconds to the model."""
    train, test = draw_training_images(task, shots, seed), test_images(task, per_class)
    classes = len(class_names(train))
    result = {"task": task, "model": model_name, "shots": shots, "seed": seed, "variant": variant,
              "test_images": len(test)}
    inputs = None  # the frozen trunk's outputs, the same for both methods: computed once
    for method, prior in (("lqf", "auto"), ("lqf-head", "head")):
        model = build(model_name, variant, classes)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            images = inputs or (with_transform(train, model.data_config), with_transform(test, model.data_config))
            trainer = LQFTrainer(model, *images, LQFTrainingArguments(output_dir=out, seed=seed, prior=prior, progress=False))
            final = trainer.train()[-1]
            if method == "lqf":
                features = (trainer.features("train"), trainer.features("eval"))
                inputs = (trainer.inputs("train"), trainer.inputs("eval"))
        result[method] = {"accuracy": 100 * final["eval_accuracy"], "prior": final["prior"], "ridge": final["ridge"],
                          "seconds": time.perf_counter() - started}
    result["linear-probe"] = probe(*features, classes, seed)
    return result


def probe(train: tuple, test: tuple, classes: int, seed: int) -> dict:
    """A linear probe (logistic regression on the pre-logit features) with its weight decay chosen on 20% of
    every class held out of the training images, refit on all of them."""
    (features, labels), (test_features, test_labels) = train, test
    held = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        members = rng.permutation(np.flatnonzero(labels.numpy() == c))
        if len(members) >= 2:
            held[members[: min(len(members) - 1, max(1, round(0.2 * len(members))))]] = True
    fit, held = torch.from_numpy(~held), torch.from_numpy(held)

    def accuracy(head, x, y) -> float:
        with torch.no_grad():
            return float((head(x).argmax(-1) == y).double().mean())

    scores = {decay: accuracy(linear_probe(features[fit], labels[fit], classes, decay), features[held], labels[held])
              for decay in PROBE_WEIGHT_DECAYS}
    decay = max(scores, key=scores.get)  # ties: the first listed, the strongest decay
    head = linear_probe(features, labels, classes, decay)
    return {"accuracy": 100 * accuracy(head, *test), "weight_decay": decay}


def test(args) -> None:
    done = set()
    if args.out.exists():
        done = {(r["task"], r["model"], r["shots"], r["seed"]) for r in map(json.loads, args.out.open())}
    for shots in args.shots:
        for model_name in args.models:
            for seed in args.seeds:
                for task in args.tasks:
                    if (task, model_name, shots, seed) in done:
                        continue
                    row = evaluate_draw(task, model_name, shots, seed, args.variant, args.per_class)
                    print(json.dumps(row), flush=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------- report
def chosen_point(row: dict) -> dict:
    return next(p for p in row["paths"][row["chosen_prior"]] if p["ridge"] == row["chosen_ridge"])


def validation_score(row: dict) -> float:
    """The task's metric (%) at the solver's choice."""
    key = "validation_balanced_accuracy" if row["task"] == "fashion-imbalanced" else "validation_accuracy"
    return 100 * chosen_point(row)[key]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def summary(args) -> None:
    rows = [json.loads(line) for path in args.results for line in path.open()]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cells = defaultdict(list)
    for r in rows:
        cells[r["task"], r["model"], r["shots"], r["variant"]].append(r)
    groups = sorted({(r["task"], r["model"], r["shots"]) for r in rows})
    lines = ["# The validation suite", "",
             "Made by `benchmarks/defaults.py run` (commands in its docstring). Every number is cross-validated on "
             "the training images (5 folds, the solver's own choice of prior and λ); **no test image is read**. "
             "Each cell: the task's metric at the solver's choice, mean ± sd over seeds, then the mean "
             "cross-validated loss (MSE to α·one-hot, α²/2 times the Brier score of f/α: a proper scoring rule) "
             "and the priors chosen.", "",
             "| task | backbone | shots | " + " | ".join(variants) + " |", "|---|---|---:|" + "---:|" * len(variants)]
    for task, model_name, shots in groups:
        row = [task, model_name.removeprefix("tf_efficientnet_"), str(shots)]
        for variant in variants:
            runs = cells.get((task, model_name, shots, variant), [])
            if not runs:
                row.append("")
                continue
            loss = statistics.mean(chosen_point(r)["validation_loss"] for r in runs)
            priors = "/".join(r["chosen_prior"] for r in runs)
            row.append(f"{mean_sd([validation_score(r) for r in runs])} (loss {loss:.1f}; {priors})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Paired differences against the first variant", "",
              "Per draw, the cross-validated loss of each variant minus the first's (same images, same folds), mean "
              "± standard error over the draws of the group; negative favours the variant.", "",
              "| task | backbone | shots | " + " | ".join(variants[1:]) + " |", "|---|---|---:|" + "---:|" * (len(variants) - 1)]
    for task, model_name, shots in groups:
        row = [task, model_name.removeprefix("tf_efficientnet_"), str(shots)]
        base = {r["seed"]: chosen_point(r)["validation_loss"] for r in cells.get((task, model_name, shots, variants[0]), [])}
        for variant in variants[1:]:
            diffs = [chosen_point(r)["validation_loss"] - base[r["seed"]]
                     for r in cells.get((task, model_name, shots, variant), []) if r["seed"] in base]
            if not diffs:
                row.append("")
                continue
            error = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            row.append(f"{statistics.mean(diffs):+.2f} ± {error:.2f} (n={len(diffs)})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Cost", "", "| variant | shots | path products (mean) | selection s (mean) | caching s (mean) |",
              "|---|---:|---:|---:|---:|"]
    for variant in variants:
        for shots in sorted({r["shots"] for r in rows}):
            runs = [r for r in rows if r["variant"] == variant and r["shots"] == shots]
            if runs:
                products = statistics.mean(sum(r["products"].values()) for r in runs)
                lines.append(f"| {variant} | {shots} | {products:.0f} | {statistics.mean(r['select_seconds'] for r in runs):.0f} | "
                             f"{statistics.mean(r['cache_seconds'] for r in runs):.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        args.report.write_text(report)


def test_summary(args) -> None:
    """The test phase's table: the defaults against LQF-head and the probe, mean ± sd over seeds, the paired
    differences (± standard error), and the issue's target (the default ≥ LQF-head and ≥ the probe, mean over
    seeds) checked per task and shot count."""
    rows = [json.loads(line) for path in args.results for line in path.open()]
    groups = defaultdict(list)
    for r in rows:
        groups[r["task"], r["model"], r["shots"]].append(r)
    lines = ["# The defaults on test images", "", "Made by `benchmarks/defaults.py test` (commands in its docstring): "
             "per draw, the defaults (`lqf`: the solver's choice of prior and λ), LQF-head and a linear probe (weight "
             "decay on a held-out fifth) trained on the same training images and read once on the task's test "
             "images (100 per class; balanced, so accuracy is the balanced accuracy). Accuracy %, mean ± sd over "
             "seeds; paired differences mean ± standard error over the seeds.", "",
             "| task | backbone | shots | seeds | lqf | lqf-head | probe | lqf − lqf-head | lqf − probe | lqf's priors | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for (task, model_name, shots), runs in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])):
        runs = sorted(runs, key=lambda r: r["seed"])
        values = {m: [r[m]["accuracy"] for r in runs] for m in ("lqf", "lqf-head", "linear-probe")}

        def paired(other: str) -> tuple[float, str]:
            diffs = [a - b for a, b in zip(values["lqf"], values[other])]
            error = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            return statistics.mean(diffs), f"{statistics.mean(diffs):+.1f} ± {error:.1f}"

        head, head_text = paired("lqf-head")
        probe_gap, probe_text = paired("linear-probe")
        met = "met" if head >= 0 and probe_gap >= 0 else "**missed**"
        priors = "/".join(f"{r['lqf']['prior']} {r['lqf']['ridge']:g}" for r in runs)
        lines.append(f"| {task} | {model_name.removeprefix('tf_efficientnet_')} | {shots} | {len(runs)} | "
                     + " | ".join(mean_sd(values[m]) for m in ("lqf", "lqf-head", "linear-probe"))
                     + f" | {head_text} | {probe_text} | {priors} | {met} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        args.report.write_text(report)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="score the variants on validation data (no test image)")
    one.add_argument("--tasks", nargs="+", default=["fashion-mnist", "mnist-5k", "fashion-upper", "digits",
                                                    "fashion-imbalanced"])
    one.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
    one.add_argument("--shots", type=int, nargs="+", default=[5, 20, 100])
    one.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    one.add_argument("--variants", nargs="+", required=True)
    one.add_argument("--out", type=Path, required=True)
    final = commands.add_parser("test", help="the chosen defaults, LQF-head and a linear probe on the test images")
    final.add_argument("--tasks", nargs="+", default=one.get_default("tasks"))
    final.add_argument("--models", nargs="+", default=one.get_default("models"))
    final.add_argument("--shots", type=int, nargs="+", default=[5, 20, 100])
    final.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    final.add_argument("--variant", required=True, help="the defaults chosen from the validation results")
    final.add_argument("--per-class", type=int, default=100, help="test images per class")
    final.add_argument("--out", type=Path, required=True)
    table = commands.add_parser("summary", help="tables of the validation scores")
    table.add_argument("results", type=Path, nargs="+")
    table.add_argument("--report", type=Path)
    tested = commands.add_parser("test-summary", help="the table of the test phase")
    tested.add_argument("results", type=Path, nargs="+")
    tested.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    {"run": run, "test": test, "summary": summary, "test-summary": test_summary}[args.command](args)


if __name__ == "__main__":
    main()
