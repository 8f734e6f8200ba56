"""The validation suite: lqf-hub's defaults chosen on validation data only, over tasks, backbones, shots, seeds.

For every task, backbone, shot count and seed the training images are drawn as `lqf-hub train` draws them
and every variant (settings of ``LQFConfig``, the image size) is scored by the solver's own choice
(`LQFTrainer.select`): 5-fold cross-validation over the training images on Krylov paths, the priors raced
(K-FAC, isotropic and LQF-head), λ by the one-standard-error rule. ``run`` never reads a test image.
``test`` evaluates the chosen defaults once per draw on the task's test split, beside LQF-head and a linear
probe (the report, not a choice). The commands of the committed results (``benchmarks/results/defaults/``;
the test phase on Lite0, and on Lite1 at 5 and 20 shots and one seed at 100; the variants on 3 seeds at 5 shots, on
2–3 seeds of Lite0 and 3 of Lite1 at 20 shots, on two seeds of Lite0 and one of Lite1 at 100: what 2 cores gave in
seven sessions, 2026-12-07/08):

    python benchmarks/defaults.py run --models tf_efficientnet_lite0 --tasks fashion-mnist --shots 100 --seeds 0 \
        --variants linearize=last:1 linearize=last:2 --out benchmarks/results/defaults/validation.jsonl
    python benchmarks/defaults.py run --models tf_efficientnet_lite0 --tasks mnist-5k digits fashion-upper \
        --shots 100 --seeds 0 --variants linearize=last:1 linearize=last:2 \
        --out benchmarks/results/defaults/validation.jsonl
    OMP_NUM_THREADS=1 python benchmarks/defaults.py run --models tf_efficientnet_lite1 --tasks fashion-mnist mnist-5k \
        fashion-upper digits --shots 100 --seeds 0 --variants linearize=last:1 linearize=last:2 \
        --out benchmarks/results/defaults/validation.jsonl   # 2026-12-07, one thread beside other runs
    OMP_NUM_THREADS=1 python benchmarks/defaults.py run --shots 5 20 --variants linearize=last:1 linearize=last:2 \
        --out benchmarks/results/defaults/validation.jsonl   # 2026-12-07, eighth session: as far as it got
    OMP_NUM_THREADS=1 python benchmarks/defaults.py run --models tf_efficientnet_lite0 --tasks fashion-mnist mnist-5k \
        fashion-upper digits --shots 100 --seeds 0 --variants damping=0.1 --out benchmarks/results/defaults/damping.jsonl
    python benchmarks/defaults.py summary benchmarks/results/defaults/validation.jsonl \
        --report benchmarks/results/defaults/validation.md
    python benchmarks/defaults.py summary benchmarks/results/defaults/validation.jsonl \
        benchmarks/results/defaults/damping.jsonl --variants linearize=last:1 damping=0.1 \
        --report benchmarks/results/defaults/damping.md
    python benchmarks/defaults.py test --models tf_efficientnet_lite0 --variant linearize=last:1 --shots 5 20 \
        --out benchmarks/results/defaults/test.jsonl
    python benchmarks/defaults.py test --models tf_efficientnet_lite0 --variant linearize=last:1 --shots 100 \
        --seeds 0 --out benchmarks/results/defaults/test-100shots.jsonl
    python benchmarks/defaults.py test --models tf_efficientnet_lite0 --variant linearize=last:1 --shots 100 \
        --seeds 1 2 --out benchmarks/results/defaults/test-100shots.jsonl   # over three sessions
    python benchmarks/defaults.py test-summary benchmarks/results/defaults/test*.jsonl \
        --report benchmarks/results/defaults/test.md
    python benchmarks/defaults.py lpft --tasks fashion-mnist mnist-5k digits fashion-upper --seeds 0 \
        --out benchmarks/results/defaults/lpft.jsonl
    OMP_NUM_THREADS=1 python benchmarks/defaults.py lpft --tasks fashion-mnist mnist-5k digits fashion-upper --seeds 1 \
        --out benchmarks/results/defaults/lpft.jsonl   # 2026-12-08 (stopped after Fashion-MNIST, then run again)
    OMP_NUM_THREADS=1 python benchmarks/defaults.py test --models tf_efficientnet_lite1 --variant linearize=last:1 \
        --shots 5 --out benchmarks/results/defaults/test.jsonl
    OMP_NUM_THREADS=1 python benchmarks/defaults.py test --models tf_efficientnet_lite1 --variant linearize=last:1 \
        --shots 20 --out benchmarks/results/defaults/test.jsonl   # 2026-12-08, one thread beside other runs
    OMP_NUM_THREADS=1 python benchmarks/defaults.py run --models tf_efficientnet_lite1 --shots 20 \
        --variants linearize=last:1 linearize=last:2 --out benchmarks/results/defaults/validation.jsonl \
        # 2026-12-08, ninth session: every task, 3 seeds
    python benchmarks/defaults.py lpft-summary benchmarks/results/defaults/lpft.jsonl \
        --report benchmarks/results/defaults/lpft.md
    OMP_NUM_THREADS=1 python benchmarks/defaults.py tolerance --shots 20 100 --seeds 0 \
        --out benchmarks/results/defaults/tolerance.jsonl   # 2026-12-08, tenth session, beside another run
    OMP_NUM_THREADS=1 python benchmarks/defaults.py tolerance --models tf_efficientnet_lite1 --shots 100 \
        --tasks fashion-mnist mnist-5k fashion-upper digits --out benchmarks/results/defaults/tolerance-lite1.jsonl
    python benchmarks/defaults.py tolerance-summary benchmarks/results/defaults/tolerance*.jsonl \
        --report benchmarks/results/defaults/tolerance.md
    OMP_NUM_THREADS=1 python benchmarks/defaults.py test --models tf_efficientnet_lite1 --variant linearize=last:1 \
        --shots 100 --seeds 0 --out benchmarks/results/defaults/test-100shots-lite1.jsonl   # 2026-12-08, beside another run
    python benchmarks/defaults.py run --models tf_efficientnet_lite0 --tasks fashion-mnist mnist-5k digits fashion-upper \
        --shots 100 --seeds 1 --variants linearize=last:1 linearize=last:2 \
        --out benchmarks/results/defaults/validation.jsonl   # 2026-12-08, tenth session (as far as it got)

The whole suite is the same commands with their defaults (five tasks, Lite0 and Lite1, 5 / 20 / 100 shots,
seeds 0 1 2): about a day on 2 cores.

Tasks, all from data that installs offline: ``fashion-mnist`` and ``mnist-5k`` (10 classes);
``fashion-upper``: Fashion-MNIST's four upper-body classes (T-shirt/top, Pullover, Coat, Shirt — the classes
it confuses most); ``digits``: scikit-learn's 1797 8×8 digits, upsampled by the backbone's transform (its
fixed 70/30 split); ``fashion-imbalanced``: Fashion-MNIST with class c drawn at ``shots · 0.75^c`` images
(a 1:8 imbalance over the ten classes), scored in balanced accuracy. A variant is ``key=value[,key=value]``
over ``linearize``, ``activation``, ``target_scale``, ``head_init``, ``image_size`` and ``damping`` (K-FAC's, in the
K-FAC prior). ``lpft`` cross-validates
the head w0 holds — the small random one or LQF-head's optimum (LP-FT), refit inside every fold — on the same
folds (``lpft_draw``). ``tolerance`` runs the solver's selection with each prior's path stopped at looser and
tighter tolerances than the library's (``tolerance_draw``): every fold's path once, cut where each would stop.
Finished rows are skipped when ``--out`` already holds them. (A first ``head=lqf-head``
variant fitted that head on all the training images before the folds, so it had seen every held-out label: its
row is kept in ``superseded.jsonl``, not in the tables.)
"""

import argparse
import json
import math
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import datasets
import numpy as np
import torch

from lqf_hub import LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.compare.baselines import linear_probe
from lqf_hub.data import class_names, label_array, load_image_dataset, sample_shots, with_transform
from lqf_hub.files import atomic_write_text
from lqf_hub.solver import selection as selection_module
from lqf_hub.solver.selection import PATH_TOLERANCE, PathPoint, choose, select, stratified_folds
from lqf_hub.solver.solve import HeadPath, KrylovPath
from lqf_hub.training.cache import TrunkCache
from lqf_hub.training.objective import Objective, trunk_outputs

DEFAULT_IMAGE_SIZE = 128
CONFIG_KEYS = {"linearize", "activation", "target_scale", "head_init"}
TRAINING_KEYS = {"damping"}  # of LQFTrainingArguments: K-FAC's damping, in the K-FAC prior M = K + γ
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


def publish(lines: list[str], report: Path | None) -> None:
    """Print a report's lines and, when ``report`` is given, write them there (atomically)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if report:
        atomic_write_text(report, text)


# ------------------------------------------------------------------------------------- variants
def variant_settings(variant: str) -> tuple[dict, int, dict]:
    """``"key=value,key=value"`` -> (LQFConfig settings, image size, LQFTrainingArguments settings)."""
    config, size, training = {}, DEFAULT_IMAGE_SIZE, {}
    for part in variant.split(","):
        key, _, value = part.partition("=")
        if key == "image_size":
            size = int(value)
        elif key in CONFIG_KEYS:
            config[key] = float(value) if key == "target_scale" else value
        elif key in TRAINING_KEYS:
            training[key] = float(value)
        else:
            raise SystemExit(f"variant {variant!r}: {key!r} is not one of "
                             f"{sorted(CONFIG_KEYS | TRAINING_KEYS | {'image_size'})}")
    return config, size, training


def build(model_name: str, variant: str, num_classes: int) -> LQFModel:
    config, size, _ = variant_settings(variant)
    model = LQFModel.from_timm(model_name, num_classes, LQFConfig(**config))
    model.set_image_size(size)
    return model


def score(task: str, model_name: str, shots: int, seed: int, variant: str) -> dict:
    """The solver's choice on one draw, and what it saw: every prior's path, products, seconds."""
    train = draw_training_images(task, shots, seed)
    model = build(model_name, variant, len(class_names(train)))
    with tempfile.TemporaryDirectory() as out:
        trainer = LQFTrainer(model, with_transform(train, model.data_config), None,
                             LQFTrainingArguments(output_dir=out, seed=seed, progress=False,
                                                  **variant_settings(variant)[2]))
        started = time.perf_counter()
        trainer.inputs("train")
        cached = time.perf_counter()
        selection = trainer.select()
        finished = time.perf_counter()
    return {"task": task, "model": model_name, "shots": shots, "seed": seed, "variant": variant,
            "images": len(train), "chosen_prior": selection.prior, "chosen_ridge": selection.ridge,
            "products": selection.products, "dropped": selection.dropped, "cache_seconds": cached - started,
            "select_seconds": finished - cached,
            "paths": {kind: [vars(p) for p in points] for kind, points in selection.paths.items()}}


def fill(out: Path, draws: list[dict], make: Callable[[dict], dict], hidden: Iterable[str] = ()) -> None:
    """Append ``make(draw)`` to the JSON lines ``out`` for every draw (row fields -> values) it does not hold yet,
    in order, so that a stopped run resumes; each new row is printed without its ``hidden`` fields."""
    done = set()
    if out.exists() and draws:
        done = {tuple(row[k] for k in draws[0]) for row in map(json.loads, out.open())}
    out.parent.mkdir(parents=True, exist_ok=True)
    for draw in draws:
        if tuple(draw.values()) in done:
            continue
        row = make(draw)
        print(json.dumps({k: v for k, v in row.items() if k not in hidden}), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run(args) -> None:
    draws = [{"task": task, "model": model_name, "shots": shots, "seed": seed, "variant": variant}
             for shots in args.shots  # cheapest first: every task and backbone gets its few-shot rows early
             for model_name in args.models for seed in args.seeds for task in args.tasks for variant in args.variants]
    fill(args.out, draws, lambda d: score(d["task"], d["model"], d["shots"], d["seed"], d["variant"]), {"paths"})


# ---------------------------------------------------------------------------------- LP-FT, honestly
LPFT_VARIANTS = ("random head", "lqf-head optimum")


def move_head_to_lqf_head(model: LQFModel, cache: TrunkCache, args: LQFTrainingArguments) -> float:
    """Move w0's head to LQF-head's optimum on ``cache`` (LP-FT, Kumar et al. 2022), its λ by the solver's
    cross-validation over those images alone (closed form: no product with the data). Returns that λ."""
    objective = Objective(model, cache, args)
    ridge = select(objective.data_term, cache.labels, cache.digests, list(objective.priors(["head"]).values()),
                   args.ridge_grid, folds=args.validation_folds, seed=args.seed, max_iterations=args.max_iterations,
                   progress=False).ridge
    data = objective.data_term()
    delta = data.flat.unflatten(HeadPath(data).solution(ridge))
    with torch.no_grad():
        model.net.head.weight += delta["head.weight"]
        model.net.head.bias += delta["head.bias"]
    return ridge


def lpft_draw(task: str, model_name: str, shots: int, seed: int) -> dict:
    """The K-FAC prior's λ path cross-validated on one draw's training images around two linearization points,
    on the same folds: the default's small random head, and LQF-head's optimum fitted in each fold on that
    fold's training part only (LP-FT) — no held-out label reaches the model that scores it. K-FAC is built at
    each fold's head from every training image's trunk output (inputs only, as the solver builds it).
    Per variant: every λ's out-of-fold loss, accuracy and balanced accuracy, and the per-image losses at λ chosen
    by the solver's rule (the largest within one standard error of the lowest loss)."""
    train = draw_training_images(task, shots, seed)
    model = build(model_name, "linearize=last:1", len(class_names(train)))
    started = time.perf_counter()
    args = LQFTrainingArguments(output_dir=".", seed=seed, progress=False)  # nothing is written
    cache = trunk_outputs(model, with_transform(train, model.data_config))
    ridges = sorted(args.ridge_grid, reverse=True)
    assignment = stratified_folds(cache.labels, cache.digests, args.validation_folds, seed)
    random_head = {n: t.detach().clone() for n, t in model.net.head.state_dict().items()}
    losses = {v: torch.zeros(len(cache), len(ridges), dtype=torch.float64) for v in LPFT_VARIANTS}
    correct = {v: torch.zeros(len(cache), len(ridges), dtype=torch.float64) for v in LPFT_VARIANTS}
    products, seconds, head_ridges = dict.fromkeys(LPFT_VARIANTS, 0), dict.fromkeys(LPFT_VARIANTS, 0.0), []
    for fold in range(args.validation_folds):
        held_rows, fit_rows = (assignment == fold).nonzero().flatten(), (assignment != fold).nonzero().flatten()
        for variant in LPFT_VARIANTS:
            began = time.perf_counter()
            if variant == "lqf-head optimum":
                head_ridges.append(move_head_to_lqf_head(model, cache.select(fit_rows.tolist()), args))
            objective = Objective(model, cache, args)
            metric = objective.priors(["kfac"])["kfac"]
            fit, held = objective.data_term(fit_rows), objective.data_term(held_rows)
            path = KrylovPath(fit, metric, ridges, tolerance=PATH_TOLERANCE["kfac"], max_iterations=args.max_iterations)
            for j, ridge in enumerate(ridges):
                sample_losses, sample_correct = held.sample_scores(path.solution(ridge))
                losses[variant][held_rows, j], correct[variant][held_rows, j] = sample_losses, sample_correct.double()
            products[variant] += path.iterations
            model.net.head.load_state_dict(random_head)
            seconds[variant] += time.perf_counter() - began
    labels = cache.labels
    result = {"task": task, "model": model_name, "shots": shots, "seed": seed, "images": len(cache),
              "head_ridges": head_ridges, "seconds": time.perf_counter() - started}
    for variant in LPFT_VARIANTS:
        points = [PathPoint(r, float(correct[variant][:, j].mean()), float(losses[variant][:, j].mean()),
                            float(losses[variant][:, j].std() / math.sqrt(len(cache))), 0.0, len(cache),
                            float(torch.stack([correct[variant][labels == c, j].mean() for c in labels.unique()]).mean()))
                  for j, r in enumerate(ridges)]
        ridge = choose({"kfac": points})[1]
        result[variant] = {"ridge": ridge, "products": products[variant], "seconds": seconds[variant],
                           "losses": losses[variant][:, ridges.index(ridge)].tolist(),
                           "path": [vars(p) for p in points]}
    return result


def lpft(args) -> None:
    draws = [{"task": task, "model": model_name, "shots": args.shots, "seed": seed}
             for seed in args.seeds for task in args.tasks for model_name in args.models]
    fill(args.out, draws, lambda d: lpft_draw(d["task"], d["model"], d["shots"], d["seed"]), LPFT_VARIANTS)


def lpft_summary(args) -> None:
    """The two linearization points side by side at each one's chosen λ: out-of-fold accuracy (balanced
    accuracy for the imbalanced task), loss, and the paired per-image loss difference."""
    rows = [json.loads(line) for path in args.results for line in path.open()]
    lines = ["# Linearizing around LQF-head's optimum (LP-FT), cross-validated honestly", "",
             "Made by `benchmarks/defaults.py lpft` and `lpft-summary` (commands in its docstring). The K-FAC prior's "
             "λ path, 5-fold cross-validated on each draw's training images (no test image is read), linearized "
             "around the default's small random head or around LQF-head's optimum fitted **in each fold on that "
             "fold's training part only** (its λ by cross-validation within that part). Each variant's λ by the "
             "solver's rule; per draw the out-of-fold metric and loss at that λ, and the paired per-image "
             "difference of the losses (LP-FT − random head; negative favours LP-FT) with its standard error.", "",
             "| task | backbone | shots | seed | random head: metric · loss (λ) | LP-FT: metric · loss (λ) "
             "| loss difference | products (random / LP-FT) | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["model"], r["shots"], r["seed"])):
        key = "validation_balanced_accuracy" if r["task"] == "fashion-imbalanced" else "validation_accuracy"

        def cell(variant: str) -> str:
            point = next(p for p in r[variant]["path"] if p["ridge"] == r[variant]["ridge"])
            return f"{100 * point[key]:.1f} · {point['validation_loss']:.1f} ({r[variant]['ridge']:g})"

        diff = torch.tensor(r["lqf-head optimum"]["losses"]) - torch.tensor(r["random head"]["losses"])
        lines.append(f"| {r['task']} | {r['model'].removeprefix('tf_efficientnet_')} | {r['shots']} | {r['seed']} | "
                     f"{cell('random head')} | {cell('lqf-head optimum')} | "
                     f"{float(diff.mean()):+.2f} ± {float(diff.std() / math.sqrt(len(diff))):.2f} | "
                     f"{r['random head']['products']} / {r['lqf-head optimum']['products']} | {r['seconds']:.0f} |")
    publish(lines, args.report)


# ------------------------------------------------------------------------------ the path tolerance
TOLERANCE_SETTINGS = [(3e-2, 3e-2), (6e-2, 3e-2), (1e-1, 3e-2), (6e-2, 6e-2), (1e-2, 1e-2)]
"""(K-FAC prior's, isotropic prior's) path tolerance: the library's before this study, looser for K-FAC, looser for
both, and the reference every choice is scored against."""


class _Memoized:
    """A path whose solutions are computed once (so the held-out outputs below are too)."""

    def __init__(self, path) -> None:
        self.path, self.solutions = path, {}

    def __getattr__(self, name: str):
        return getattr(self.path, name)

    def solution(self, ridge: float) -> torch.Tensor:
        if ridge not in self.solutions:
            self.solutions[ridge] = self.path.solution(ridge)
        return self.solutions[ridge]


class _HeldOut:
    """A fold's held-out data term whose outputs at a δ already seen are not recomputed."""

    def __init__(self, term) -> None:
        self.term, self.seen = term, {}

    def __getattr__(self, name: str):
        return getattr(self.term, name)

    def outputs(self, delta: torch.Tensor) -> torch.Tensor:
        if id(delta) not in self.seen:
            self.seen[id(delta)] = (delta, self.term.outputs(delta))  # δ kept alive: its id stays its own
        return self.seen[id(delta)][1]


def _first_steps(path: KrylovPath, steps: int) -> KrylovPath:
    """The path as Lanczos stopped after ``steps`` products would have left it (the run is deterministic)."""
    part = object.__new__(KrylovPath)
    part.metric, part.beta0, part.device = path.metric, path.beta0, path.device
    part.alphas, part.betas, part.basis = path.alphas[:steps], path.betas[:steps], path.basis[:steps]
    return part


def tolerance_draw(task: str, model_name: str, shots: int, seed: int) -> dict:
    """The solver's choice on one draw (raced 5-fold cross-validation, ``select`` itself) with the K-FAC and
    isotropic priors' paths stopped at each of ``TOLERANCE_SETTINGS``: every fold's path is run once to the
    tightest tolerance and cut where a looser one would have stopped it, so the settings differ in nothing
    else. Per setting: products, the choice, and every prior's path."""
    train = draw_training_images(task, shots, seed)
    model = build(model_name, "linearize=last:1", len(class_names(train)))
    started = time.perf_counter()
    args = LQFTrainingArguments(output_dir=".", seed=seed, progress=False)  # nothing is written
    cache = trunk_outputs(model, with_transform(train, model.data_config))
    objective = Objective(model, cache, args)
    metrics = objective.priors(["kfac", "isotropic", "head"])
    assignment = stratified_folds(cache.labels, cache.digests, args.validation_folds, seed)
    ridges, tightest = sorted(args.ridge_grid, reverse=True), min(min(s) for s in TOLERANCE_SETTINGS)
    full, held_terms, cut = {}, {}, {}

    def make_data(rows: torch.Tensor):
        folds = assignment[rows].unique()
        if len(folds) == 1:  # a fold's held-out part
            fold = int(folds[0])
            held_terms.setdefault(fold, _HeldOut(objective.data_term(rows)))
            return held_terms[fold]
        return ("fit", int(next(f for f in range(args.validation_folds) if f not in folds.tolist())), rows)

    def path_at(setting: tuple[float, float]):
        def path(fit, metric, ridges_, max_iterations, progress, where):
            _, fold, rows = fit
            if (fold, metric.kind) not in full:
                term = objective.data_term(rows)
                full[fold, metric.kind] = (HeadPath(term) if metric.kind == "head" else
                                           KrylovPath(term, metric, ridges, tolerance=tightest,
                                                      max_iterations=args.max_iterations))
            reference = full[fold, metric.kind]
            if metric.kind == "head":
                return cut.setdefault((fold, "head", 0), _Memoized(reference))
            tolerance = setting[0] if metric.kind == "kfac" else setting[1]
            steps = next((k for k in range(1, reference.iterations + 1)
                          if _first_steps(reference, k).residual(min(ridges)) <= tolerance), reference.iterations)
            return cut.setdefault((fold, metric.kind, steps), _Memoized(_first_steps(reference, steps)))
        return path

    settings = {}
    for setting in TOLERANCE_SETTINGS:
        original = selection_module._path
        selection_module._path = path_at(setting)
        try:
            found = select(make_data, cache.labels, cache.digests, list(metrics.values()), ridges,
                           folds=args.validation_folds, seed=seed, max_iterations=args.max_iterations, progress=False)
        finally:
            selection_module._path = original
        settings[f"{setting[0]:g}/{setting[1]:g}"] = {
            "prior": found.prior, "ridge": found.ridge, "products": found.products, "dropped": found.dropped,
            "passes": found.passes, "paths": {kind: [vars(p) for p in points] for kind, points in found.paths.items()}}
    return {"task": task, "model": model_name, "shots": shots, "seed": seed, "images": len(cache),
            "settings": settings, "seconds": time.perf_counter() - started}


def tolerance(args) -> None:
    draws = [{"task": task, "model": model_name, "shots": shots, "seed": seed}
             for shots in args.shots for model_name in args.models for seed in args.seeds for task in args.tasks]
    fill(args.out, draws, lambda d: tolerance_draw(d["task"], d["model"], d["shots"], d["seed"]), {"settings"})


def tolerance_summary(args) -> None:
    """Per draw and setting: products, the choice, and the reference's cross-validated loss at that choice
    against at its own (how much worse the looser setting's choice is, in the reference's standard errors)."""
    rows = [json.loads(line) for path in args.results for line in path.open()]
    labels = [f"{k:g}/{i:g}" for k, i in TOLERANCE_SETTINGS]
    reference = labels[-1]
    lines = ["# The selection's path tolerance, per prior", "",
             "Made by `benchmarks/defaults.py tolerance` and `tolerance-summary` (commands in its docstring). Raced "
             "5-fold cross-validation on each draw's training images (no test image), every fold's path run once to "
             f"{reference} and cut where the setting's tolerance (K-FAC prior / isotropic prior, relative gradient at "
             "the smallest λ) would have stopped it. Per setting: the paths' products (K-FAC + isotropic), the choice "
             f"(prior λ), and the regret: the {reference} reference's cross-validated loss at the setting's choice "
             "minus at its own, in its standard errors (0: the same choice).", "",
             "| task | backbone | shots | seed | " + " | ".join(labels) + " |",
             "|---|---|---:|---:|" + "---|" * len(labels)]
    totals, changed, regrets, errors = defaultdict(int), defaultdict(int), defaultdict(list), defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["shots"], r["task"], r["model"], r["seed"])):
        ref = r["settings"][reference]
        ref_points = {(kind, p["ridge"]): p for kind, points in ref["paths"].items() for p in points}
        own = ref_points[ref["prior"], ref["ridge"]]
        cells = []
        for label in labels:
            s = r["settings"][label]
            products = s["products"].get("kfac", 0) + s["products"].get("isotropic", 0)
            regret = (ref_points[s["prior"], s["ridge"]]["validation_loss"] - own["validation_loss"]) / own["standard_error"]
            totals[label] += products
            changed[label] += (s["prior"], s["ridge"]) != (r["settings"][labels[0]]["prior"],
                                                           r["settings"][labels[0]]["ridge"])
            regrets[label].append(regret)
            for kind, points in s["paths"].items():  # how far each scored point is from the reference's score
                errors[label, kind] += [abs(p["validation_loss"] - ref_points[kind, p["ridge"]]["validation_loss"])
                                  / ref_points[kind, p["ridge"]]["standard_error"] for p in points
                                  if p["images"] == ref_points[kind, p["ridge"]]["images"]]
            cells.append(f"{products}: {s['prior']} {s['ridge']:g} ({regret:+.2f})")
        lines.append(f"| {r['task']} | {r['model'].removeprefix('tf_efficientnet_')} | {r['shots']} | {r['seed']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Over all draws: the paths' products, how many choices differ from " + labels[0] + "'s, the regret, and "
              "the largest distance of any scored point's cross-validated loss (every prior, every λ, where the race "
              "let it score the same images) from the reference's, in the reference's standard errors.", "",
              "| setting | products, all draws | choices unlike " + labels[0] + "'s | largest regret (SE) | "
              "mean regret (SE) | largest score error, K-FAC / isotropic prior (SE) |", "|---|---:|---:|---:|---:|---:|"]
    for label in labels:
        lines.append(f"| {label} | {totals[label]} | {changed[label]} of {len(rows)} | {max(regrets[label]):+.2f} | "
                     f"{statistics.mean(regrets[label]):+.2f} | {max(errors[label, 'kfac']):.2f} / "
                     f"{max(errors[label, 'isotropic']):.2f} |")
    publish(lines, args.report)


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
            trainer = LQFTrainer(model, *images, LQFTrainingArguments(output_dir=out, seed=seed, prior=prior, progress=False,
                                                                      **variant_settings(variant)[2]))
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
    features, labels = train
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
    draws = [{"task": task, "model": model_name, "shots": shots, "seed": seed}
             for shots in args.shots for model_name in args.models for seed in args.seeds for task in args.tasks]
    fill(args.out, draws, lambda d: evaluate_draw(d["task"], d["model"], d["shots"], d["seed"], args.variant,
                                                  args.per_class))


# --------------------------------------------------------------------------------------- report
def chosen_point(row: dict) -> dict:
    return next(p for p in row["paths"][row["chosen_prior"]] if p["ridge"] == row["chosen_ridge"])


def validation_score(row: dict) -> float:
    """The task's metric (%) at the solver's choice."""
    key = "validation_balanced_accuracy" if row["task"] == "fashion-imbalanced" else "validation_accuracy"
    return 100 * chosen_point(row)[key]


def mean_sd(values: list[float]) -> str:
    """Mean ± sd over the draws; one draw has no spread to report (the tables say how many draws)."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summary(args) -> None:
    rows = [json.loads(line) for path in args.results for line in path.open()]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if args.variants:  # these columns only, the first the baseline, in the groups where another one ran
        variants = args.variants
        ran = {(r["task"], r["model"], r["shots"]) for r in rows if r["variant"] in variants[1:]}
        rows = [r for r in rows if r["variant"] in variants and (r["task"], r["model"], r["shots"]) in ran]
    cells = defaultdict(list)
    for r in rows:
        cells[r["task"], r["model"], r["shots"], r["variant"]].append(r)
    groups = sorted({(r["task"], r["model"], r["shots"]) for r in rows})
    lines = ["# The validation suite", "",
             "Made by `benchmarks/defaults.py run` (commands in its docstring). Every number is cross-validated on "
             "the training images (5 folds, the solver's own choice of prior and λ); **no test image is read**. "
             "Each cell: the task's metric at the solver's choice, mean ± sd over seeds (n draws), then the mean "
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
            row.append(f"{mean_sd([validation_score(r) for r in runs])} (n={len(runs)}; loss {loss:.1f}; {priors})")
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
            if len(diffs) == 1:
                row.append(f"{diffs[0]:+.2f} (one draw)")
                continue
            error = statistics.stdev(diffs) / math.sqrt(len(diffs))
            row.append(f"{statistics.mean(diffs):+.2f} ± {error:.2f} (n={len(diffs)})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Cost", "", "Mean over the tasks and seeds of each backbone (the runs shared the cores with other "
              "work: seconds compare within a session at best).", "",
              "| backbone | variant | shots | path products (mean) | selection s (mean) | caching s (mean) |",
              "|---|---|---:|---:|---:|---:|"]
    for model in sorted({r["model"] for r in rows}):
        for variant in variants:
            for shots in sorted({r["shots"] for r in rows}):
                runs = [r for r in rows if r["model"] == model and r["variant"] == variant and r["shots"] == shots]
                if runs:
                    products = statistics.mean(sum(r["products"].values()) for r in runs)
                    lines.append(f"| {model.removeprefix('tf_efficientnet_')} | {variant} | {shots} | {products:.0f} | "
                                 f"{statistics.mean(r['select_seconds'] for r in runs):.0f} | "
                                 f"{statistics.mean(r['cache_seconds'] for r in runs):.0f} |")
    publish(lines, args.report)


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
            if len(diffs) == 1:  # one draw: no standard error to report
                return diffs[0], f"{diffs[0]:+.1f}"
            error = statistics.stdev(diffs) / math.sqrt(len(diffs))
            return statistics.mean(diffs), f"{statistics.mean(diffs):+.1f} ± {error:.1f}"

        head, head_text = paired("lqf-head")
        probe_gap, probe_text = paired("linear-probe")
        met = "met" if head >= 0 and probe_gap >= 0 else "**missed**"
        priors = "/".join(f"{r['lqf']['prior']} {r['lqf']['ridge']:g}" for r in runs)
        lines.append(f"| {task} | {model_name.removeprefix('tf_efficientnet_')} | {shots} | {len(runs)} | "
                     + " | ".join(mean_sd(values[m]) for m in ("lqf", "lqf-head", "linear-probe"))
                     + f" | {head_text} | {probe_text} | {priors} | {met} |")
    publish(lines, args.report)


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
    table.add_argument("--variants", nargs="+", help="only these (the first: what the others are paired against)")
    table.add_argument("--report", type=Path)
    tested = commands.add_parser("test-summary", help="the table of the test phase")
    tested.add_argument("results", type=Path, nargs="+")
    tested.add_argument("--report", type=Path)
    honest = commands.add_parser("lpft", help="cross-validate the random head against LQF-head's optimum as w0's head")
    honest.add_argument("--tasks", nargs="+", default=one.get_default("tasks"))
    honest.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0"])
    honest.add_argument("--shots", type=int, default=100)
    honest.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    honest.add_argument("--out", type=Path, required=True)
    honest_table = commands.add_parser("lpft-summary", help="the table of the LP-FT comparison")
    honest_table.add_argument("results", type=Path, nargs="+")
    honest_table.add_argument("--report", type=Path)
    settle = commands.add_parser("tolerance", help="the selection with each prior's path stopped at looser tolerances")
    settle.add_argument("--tasks", nargs="+", default=one.get_default("tasks"))
    settle.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0"])
    settle.add_argument("--shots", type=int, nargs="+", default=[20, 100])
    settle.add_argument("--seeds", type=int, nargs="+", default=[0])
    settle.add_argument("--out", type=Path, required=True)
    settle_table = commands.add_parser("tolerance-summary", help="the table of the tolerance study")
    settle_table.add_argument("results", type=Path, nargs="+")
    settle_table.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    {"run": run, "test": test, "summary": summary, "test-summary": test_summary, "lpft": lpft,
     "lpft-summary": lpft_summary,
     "tolerance": tolerance, "tolerance-summary": tolerance_summary}[args.command](args)


if __name__ == "__main__":
    main()
