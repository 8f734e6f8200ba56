"""Does LQF pay off on *this* data? LQF, its ablations, a linear probe and fine-tuning on shared splits.

For every shot count and seed, ``shots`` training images per class are drawn with the seed. Every method
chooses its one regularising hyperparameter on those training images only and is then refit on all of them:
the solved LQF variants choose the prior and λ as ``lqf-hub train`` does, by K-fold cross-validation over the
training images on their regularisation paths (a Krylov path per fold and prior serves every λ); the methods trained by SGD
hold out one stratified part (``validation_fraction`` of every class, split by the images' content digests
and the seed) and choose on it — the learning rate and augmentation for fine-tuning, the weight decay for
the probe, the number of epochs for the early-stopped SGD variants (K folds would cost them K runs per
candidate). The test images (one stratified subset, the same for every seed and method) are read once per
final model, for the report.

Runs are appended to ``runs.jsonl`` as they finish; a sweep restarted on the same settings skips them, one
with more shots, seeds or methods adds only what is missing, and a method whose definition or grid changed
is run again (its former runs move to ``superseded.jsonl``). ``report`` turns the runs into
the table, the PNG and the targets.
"""

import datetime
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import backbone_from_name
from ..config import LQFConfig, linearize_from_text
from ..data import (
    MissingSplit,
    class_names,
    label_array,
    load_image_dataset,
    sample_shots,
    split_validation,
    with_transform,
)
from ..errors import TrainingDiverged
from ..files import atomic_write_text
from ..modeling.calibration import fit_temperature, probability_metrics
from ..modeling.model import LQFModel
from ..training.arguments import LQFTrainingArguments
from ..training.cache import content_digests
from ..training.trainer import LQFTrainer
from .baselines import fine_tune, laplace_predictive, linear_probe, predict
from .methods import METHODS, Method
from .report import write_report

RUNS_FILE = "runs.jsonl"
SUPERSEDED_FILE = "superseded.jsonl"  # runs of a method whose definition or grid has changed since


def _field(default, text: str):
    factory = (lambda: list(default)) if isinstance(default, list) else None
    return field(default_factory=factory, metadata={"help": text}) if factory else field(default=default, metadata={"help": text})


@dataclass
class CompareSettings:
    """One comparison: dataset, backbone, shot counts, seeds, and each method's validation grid. The command line
    (``lqf-hub compare``) offers every field but the data ones as an option; a preset fills the rest."""

    dataset: str = _field("fashion-mnist", "Dataset: a built-in name, a local directory or a Hub dataset id.")
    model: str = _field("tf_efficientnet_lite0", "Backbone: a timm name or a Hugging Face repo id.")
    weights: str | None = _field(None, "Base weights for a timm model: a .safetensors state dict or a legacy "
                                 "EfficientNet-Lite .pth (unset: the pretrained ones).")
    image_size: int | None = _field(64, "Input resolution (unset: the model's own).")
    shots: list[int] = _field([2, 5, 10], "Training images per class, one sweep point each (>= 2; 0: all the "
                              "training images).")
    seeds: list[int] = _field([0, 1, 2], "Seeds: each draws its own training images (and held-out part).")
    test_per_class: int = _field(50, "Test images per class, one stratified subset for every run (0: the whole split).")
    methods: list[str] = _field(list(METHODS), f"Methods to run, from: {', '.join(METHODS)}.")
    linearize: str | None = _field(None, "What the LQF methods linearize (unset: LQFConfig's default); lqf-head keeps 'head'.")
    validation_fraction: float = _field(0.2, "Share of every class of the training images held out for the choices "
                                        "of the SGD-trained methods.")
    ft_learning_rates: list[float] = _field([0.003, 0.01, 0.03, 0.1, 0.3], "Fine-tuning learning rates to choose from.")
    ft_augmentations: list[str] = _field(["none"], "Fine-tuning augmentations to choose from: 'timm' "
                                         "(timm's training transform: random resized crop, flip, colour jitter), 'none'.")
    ft_epochs: int = _field(10, "Fine-tuning epochs (more on few-shot sets, see ft_min_steps).")
    ft_min_steps: int = _field(50, "Fine-tuning steps at least, so that few-shot runs converge.")
    ft_batch_size: int = _field(16, "Fine-tuning batch size.")
    ft_label_smoothing: float = _field(0.1, "Fine-tuning label smoothing (timm recipes: 0.1).")
    sgd_epochs: list[int] = _field([5, 20, 60], "Epochs to choose from for the early-stopped SGD variants.")
    probe_weight_decays: list[float] = _field([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0],
                                              "Probe weight decays to choose from.")
    image_column: str | None = _field(None, "Image column (default: detected).")
    label_column: str | None = _field(None, "Label column (default: detected).")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
        if not self.shots or any(s < 0 or s == 1 for s in self.shots):
            raise ValueError(f"`shots` must all be >= 2 (or 0: all the training images), got {self.shots}: with one "
                             "image per class none can be held out to choose hyperparameters on validation data, "
                             "for fine-tuning's learning rate or LQF's prior and λ alike.")
        if self.weights is not None:
            if "/" in self.model:
                raise ValueError(f"`weights` replace a timm model's pretrained weights; {self.model!r} is a Hugging "
                                 "Face repo id (its weights are the repo's).")
            if not os.path.isfile(self.weights):
                raise ValueError(f"`weights` {self.weights} does not exist.")
        if not self.seeds:
            raise ValueError("`seeds` must hold at least one seed.")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"`validation_fraction` must be in (0, 1), got {self.validation_fraction}.")
        for name in ("ft_learning_rates", "ft_augmentations", "sgd_epochs", "probe_weight_decays"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` must hold at least one value.")
        wrong = [a for a in self.ft_augmentations if a not in ("timm", "none")]
        if wrong:
            raise ValueError(f"`ft_augmentations` holds {wrong}; choose from 'timm', 'none'.")

    def data_fingerprint(self) -> str:
        """What every run in one output directory must share: the data, the backbone, the test images."""
        return _digest({k: getattr(self, k) for k in DATA_FIELDS if k not in LATER_DATA_FIELDS or getattr(self, k)})

    def method_fingerprint(self, name: str) -> str:
        """What makes a run of method ``name`` current: its definition and the grids it chooses from. Changing
        them reruns that method only; shots, seeds and methods may grow between restarts."""
        method = METHODS[name]
        fields = {k: getattr(self, k) for k in METHOD_FIELDS[method.kind]}
        return _digest({"kind": method.kind, "config": method.config, "training": method.training, **fields})


def _digest(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# what decides the draws and the test images, and what each kind of method chooses with (besides its Method)
LATER_DATA_FIELDS = ("weights",)  # left out of the fingerprint while unset: runs written before they existed stay current
DATA_FIELDS = ("dataset", "model", "weights", "image_size", "test_per_class", "image_column", "label_column")
METHOD_FIELDS = {
    "solve": ("linearize",),  # λ by cross-validation over all the training images: no held-out part
    "sgd": ("linearize", "validation_fraction", "sgd_epochs"),
    "probe": ("validation_fraction", "probe_weight_decays"),
    "laplace": ("validation_fraction", "probe_weight_decays"),  # the probe's MAP, then its posterior
    "ft": ("validation_fraction", "ft_learning_rates", "ft_augmentations", "ft_epochs", "ft_min_steps",
           "ft_batch_size", "ft_label_smoothing"),
}


PRESETS = {
    # 2 cores: 64 px, 2-10 shots, 3 seeds, 500 test images. Fine-tuning (17 ms per image and step at 64 px on
    # 2 cores) gets no augmentation: on a 50-shot Fashion-MNIST draw, validation preferred none at every
    # learning rate (benchmarks/results/compare/). Its learning rates and the probe's weight decays span
    # two decades more than at first: with 0.01-0.1 fine-tuning took an end of the grid on 12 of 18 draws, with
    # 1e-4-1 the probe took the top on 16 of 18 (2026-12-04). The ablations make the sweep about three times
    # longer: the preset runs the contenders a user chooses between, `--methods` adds the ablations.
    "cpu": CompareSettings(methods=["fine-tuning", "linear-probe", "lqf", "lqf-head"]),
    # 2 cores at the default job's 128 px (4x the pixels of 'cpu'): 5-100 shots, fine-tuning's grid narrowed to the
    # learning rates chosen on 27 of the 30 committed fine-tuning runs (all six at 100 shots chose 0.01 or 0.03;
    # benchmarks/results/compare/*/runs.jsonl), so that one dataset's sweep fits a working day (the 100-shot
    # fine-tuning runs dominate: 3 rates x 10 epochs of 1000 images per seed)
    "cpu128": CompareSettings(image_size=128, shots=[5, 20, 100], methods=["fine-tuning", "linear-probe", "lqf", "lqf-head"],
                              ft_learning_rates=[0.01, 0.03, 0.1]),
    # one GPU: the model's own resolution, the paper's shot range, the whole test split, wider grids
    "gpu": CompareSettings(image_size=None, shots=[2, 5, 10, 20, 50, 100], test_per_class=0,
                           ft_learning_rates=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3], ft_augmentations=["timm", "none"],
                           ft_epochs=30, ft_min_steps=300, ft_batch_size=32, sgd_epochs=[10, 30, 100]),
}


@dataclass
class Draw:
    """The training images of one (shots, seed), their held-out part, and the shared test images. Images are
    decoded and preprocessed once (``*_items``: ``{"pixel_values", "label"}``); ``train`` keeps the raw images
    for augmentation."""

    shots: int
    seed: int
    train: datasets.Dataset
    train_items: list[dict]
    test_items: list[dict]
    fit: np.ndarray  # indices into train: what candidates are fit on
    held: np.ndarray  # indices into train: what candidates are scored on
    num_classes: int
    data_config: dict[str, Any]

    def items(self, rows: np.ndarray | None) -> list[dict]:
        return self.train_items if rows is None else [self.train_items[i] for i in rows]


def run_comparison(settings: CompareSettings, output_dir: str | Path, *, progress: bool = True,
                   command: str | None = None) -> list[dict]:
    """Run every (shots, seed, method) not yet in ``output_dir/runs.jsonl``; returns all runs of these settings.
    The report (``report.write_report``, with ``command`` beside the table) is written after each draw."""
    output = Path(output_dir)
    runs = load_runs(output, settings)
    done = {_key(r["method"], r["shots"], r["seed"]) for r in runs}
    todo = [(s, seed, m) for s in settings.shots for seed in settings.seeds for m in settings.methods
            if _key(m, s, seed) not in done]
    if not todo:
        write_report(settings, runs, output, command)
        return runs
    backbone = _backbone(settings)
    data_config = dict(backbone.data_config)
    if settings.image_size:
        data_config["input_size"] = [data_config["input_size"][0], settings.image_size, settings.image_size]
    train_full, test = _load_splits(settings)
    test_items = _decoded(test, data_config)
    output.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="compare", disable=not progress)
    for shots in settings.shots:
        for seed in settings.seeds:
            methods = [m for (s, d, m) in todo if (s, d) == (shots, seed)]
            if not methods:
                continue
            draw = _draw(train_full, test_items, shots, seed, settings.validation_fraction, data_config)
            for name in methods:
                bar.set_postfix_str(f"{name}, {shots} shots, seed {seed}")
                run = {"method": name, "shots": shots, "seed": seed, "data": settings.data_fingerprint(),
                       "images_per_class": len(draw.train) / draw.num_classes,
                       "settings": settings.method_fingerprint(name),
                       **_run_method(METHODS[name], draw, settings),
                       "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                with open(output / RUNS_FILE, "a") as f:  # one line per finished run: a kill loses at most one
                    f.write(json.dumps(run) + "\n")
                runs.append(run)
                bar.update()
            write_report(settings, runs, output, command)
    bar.close()
    return runs


def load_runs(output: Path, settings: CompareSettings) -> list[dict]:
    """The current runs in ``output`` for these settings. Runs of another dataset, backbone or test set are an
    error; runs of a method whose definition or grid has changed since are moved to ``superseded.jsonl`` (so
    that they are rerun, and kept)."""
    path = output / RUNS_FILE
    if not path.is_file():
        return []
    runs, superseded = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {number} is not JSON (a run cut short?): delete that line and restart.") from None
        if run.get("data") != settings.data_fingerprint():
            raise ValueError(f"{path} holds runs of another comparison (other dataset, model, image size or test "
                             "images); use another output directory, or the same settings to resume.")
        current = run["method"] in METHODS and run.get("settings") == settings.method_fingerprint(run["method"])
        (runs if current else superseded).append(run)
    if superseded:
        with open(output / SUPERSEDED_FILE, "a") as f:
            f.writelines(json.dumps(run) + "\n" for run in superseded)
        atomic_write_text(path, "".join(json.dumps(run) + "\n" for run in runs))
        warnings.warn(f"{len(superseded)} run(s) of methods whose definition or grid changed were moved to "
                      f"{output / SUPERSEDED_FILE}; they will be rerun.", stacklevel=2)
    return runs


def _backbone(settings: CompareSettings):
    """The pretrained backbone of the comparison, with ``settings.weights`` in place of timm's where given."""
    if settings.weights:
        from ..adapters.timm import timm_backbone

        return timm_backbone(settings.model, checkpoint_path=settings.weights)
    return backbone_from_name(settings.model)


def _key(method: str, shots: int, seed: int) -> str:
    return f"{method}/{shots}/{seed}"


def _load_splits(settings: CompareSettings) -> tuple[datasets.Dataset, datasets.Dataset]:
    columns = {"image_column": settings.image_column, "label_column": settings.label_column}
    train = load_image_dataset(settings.dataset, "train", **columns)
    try:
        test = load_image_dataset(settings.dataset, "test", **columns)
    except MissingSplit:  # as `lqf-hub train` does: a fixed part of the training split becomes the test split
        train, test = split_validation(train, 0.2, seed=0)
    if settings.test_per_class:
        test = sample_shots(test, settings.test_per_class, seed=1000, at_most=True)
    return train, test


def _draw(train_full, test_items: list[dict], shots: int, seed: int, fraction: float, data_config: dict) -> Draw:
    train = sample_shots(train_full, shots, seed=seed) if shots else train_full
    items = _decoded(train, data_config)
    labels = torch.tensor(label_array(train))  # a copy: Arrow gives a read-only array
    fit, held = stratified_split(labels, content_digests(items), fraction, seed)
    return Draw(shots, seed, train, items, test_items, fit.numpy(), held.numpy(), len(class_names(train)), data_config)


def stratified_split(labels: torch.Tensor, keys: torch.Tensor, fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, held_out)`` with ``fraction`` of every class held out (at least one, never all).

    ``keys [N, k]`` (uint8) identify the items (content digests): an item is held out by the hash of the seed
    and its key, so the split is a function of the set of images, not of their order.
    """
    fit, held = [], []
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().flatten().tolist()
        members.sort(key=lambda i: hashlib.sha256(seed.to_bytes(8, "little", signed=True) + keys[i].numpy().tobytes()).digest())
        members = torch.tensor(members)
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def _decoded(dataset: datasets.Dataset, data_config: dict) -> list[dict]:
    """Every item preprocessed once (without augmentation): ``[{"pixel_values": [3, H, W], "label": int}]``."""
    transformed = with_transform(dataset, data_config)
    return [transformed[i] for i in range(len(transformed))]


def _run_method(method: Method, draw: Draw, settings: CompareSettings) -> dict:
    """``{"accuracy", "error", "seconds", "chosen", "validation", "probabilities", ...}``: test accuracy of the final
    model, time to it (choice included), the chosen value, every candidate's held-out score and the test NLL, ECE and
    Brier score of the model's probabilities (``{way they were made: {"nll", "ece", "brier"}}``)."""
    runner = {"solve": _run_solve, "sgd": _run_sgd, "probe": _run_probe, "laplace": _run_laplace,
              "ft": _run_fine_tuning}[method.kind]
    started = time.perf_counter()
    try:
        result = runner(method, draw, settings)
    except (RuntimeError, TrainingDiverged) as err:  # no certificate within the budget, or the loop diverged
        result = {"accuracy": math.nan, "failed": str(err).split("\n")[0]}
    return {**result, "error": 1 - result["accuracy"], "seconds": time.perf_counter() - started}


def _lqf_trainer(method: Method, draw: Draw, settings: CompareSettings, rows: np.ndarray | None, eval_rows,
                 output_dir: str, **training) -> LQFTrainer:
    """An LQF trainer on ``train[rows]`` (all: None) evaluating on ``train[eval_rows]`` (None: the test images)."""
    config = {**({"linearize": linearize_from_text(settings.linearize)} if settings.linearize else {}), **method.config}
    model = LQFModel.from_backbone(_backbone(settings), draw.num_classes, LQFConfig(**config))
    model.set_image_size(draw.data_config["input_size"][-1])
    evaluation = draw.test_items if eval_rows is None else draw.items(eval_rows)
    args = LQFTrainingArguments(output_dir=output_dir, seed=draw.seed, progress=False,
                                **{**method.training, **training})
    return LQFTrainer(model, draw.items(rows), evaluation, args)


def _run_solve(method: Method, draw: Draw, settings: CompareSettings) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer = _lqf_trainer(method, draw, settings, None, None, out)
        final = trainer.train()[-1]
    selection = trainer.selection
    return {"accuracy": final["eval_accuracy"], "chosen": {"prior": final["prior"], "ridge": final["ridge"]},
            "probabilities": {CALIBRATED: {k: final[f"eval_{k}"] for k in PROBABILITY_METRICS}},
            "validation": [{"ridge": p["ridge"], "accuracy": p["validation_accuracy"], "loss": p["validation_loss"]}
                           for p in selection["paths"][selection["prior"]]],  # the chosen prior's path
            "best_loss": {kind: min(p["validation_loss"] for p in path) for kind, path in selection["paths"].items()},
            "certificate": {k: final[k] for k in ("relative_gradient_norm", "suboptimality_bound", "iterations",
                                                  "path_iterations")}}


def _run_sgd(method: Method, draw: Draw, settings: CompareSettings) -> dict:
    def score(epochs: int) -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as out:
            trainer = _lqf_trainer(method, draw, settings, draw.fit, draw.held, out, **_sgd_run(epochs))
            final = trainer.train()[-1]
        return final["eval_accuracy"], final["eval_loss"]

    chosen, validation = _choose([{"epochs": e} for e in settings.sgd_epochs], lambda c: score(c["epochs"]))
    with tempfile.TemporaryDirectory() as out:
        final = _lqf_trainer(method, draw, settings, None, None, out, **_sgd_run(chosen["epochs"])).train()[-1]
    return {"accuracy": final["eval_accuracy"], "chosen": chosen, "validation": validation,
            "probabilities": {SOFTMAX: {k: final[f"eval_{k}"] for k in PROBABILITY_METRICS}},  # T = 1: none fitted
            "train_loss": final["train_loss"]}


def _sgd_run(epochs: int) -> dict:
    return {"epochs": epochs, "eval_every": epochs, "save_every": epochs}


def _probe(draw: Draw, settings: CompareSettings) -> dict:
    """The linear probe, its weight decay chosen on the held-out part, refit on every training image: ``{"head",
    "features", "labels", "test_features", "test_labels", "chosen", "validation"}`` (features ``[N, D]``)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _lqf_trainer(Method("solve", "", config={"linearize": "head"}), draw, settings, None, None, out)
        features, labels = trainer.features("train")
        test_features, test_labels = trainer.features("eval")
    fit, held = torch.as_tensor(draw.fit), torch.as_tensor(draw.held)

    def score(weight_decay: float) -> tuple[float, float]:
        head = linear_probe(features[fit], labels[fit], draw.num_classes, weight_decay)
        with torch.no_grad():
            return _accuracy_and_loss(head(features[held]), labels[held])

    chosen, validation = _choose([{"weight_decay": w} for w in settings.probe_weight_decays],
                                 lambda c: score(c["weight_decay"]))
    head = linear_probe(features, labels, draw.num_classes, chosen["weight_decay"])
    return {"head": head, "features": features, "labels": labels, "test_features": test_features,
            "test_labels": test_labels, "chosen": chosen, "validation": validation}


def _run_probe(method: Method, draw: Draw, settings: CompareSettings) -> dict:
    probe = _probe(draw, settings)
    with torch.no_grad():
        logits = probe["head"](probe["test_features"])
    return {**_scores(logits.double().softmax(-1), probe["test_labels"], SOFTMAX),
            "chosen": probe["chosen"], "validation": probe["validation"]}


def _run_laplace(method: Method, draw: Draw, settings: CompareSettings) -> dict:
    probe = _probe(draw, settings)
    probabilities, precision = laplace_predictive(probe["head"], probe["features"], probe["labels"],
                                                  probe["test_features"])
    return {**_scores(probabilities, probe["test_labels"], PROBIT), "chosen": probe["chosen"],
            "validation": probe["validation"], "prior_precision": precision}


def _run_fine_tuning(method: Method, draw: Draw, settings: CompareSettings) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = _backbone(settings)
    backbone.network.to(device)

    def train(rows: np.ndarray | None, candidate: dict):
        if candidate["augmentation"] == "timm":
            images = draw.train if rows is None else draw.train.select(rows)
            images = with_transform(images, draw.data_config, augment=True)
        else:
            images = draw.items(rows)
        return fine_tune(backbone.network, backbone.num_features, draw.num_classes, images,
                         epochs=settings.ft_epochs, min_steps=settings.ft_min_steps, batch_size=settings.ft_batch_size,
                         learning_rate=candidate["learning_rate"], label_smoothing=settings.ft_label_smoothing,
                         seed=draw.seed, progress=False)

    held = draw.items(draw.held)
    candidates = [{"learning_rate": lr, "augmentation": a}
                  for lr in settings.ft_learning_rates for a in settings.ft_augmentations]
    held_out = {}  # each candidate's held-out logits and labels: the chosen one's fit the temperature

    def score(candidate: dict) -> tuple[float, float]:
        held_out[json.dumps(candidate)] = predict(train(draw.fit, candidate), held)
        return _accuracy_and_loss(*held_out[json.dumps(candidate)])

    chosen, validation = _choose(candidates, score)
    temperature = fit_temperature(*held_out[json.dumps(chosen)])
    logits, labels = predict(train(None, chosen), draw.test_items)
    result = _scores(logits.double().softmax(-1), labels, SOFTMAX)
    result["probabilities"][TEMPERATURE_SCALED] = probability_metrics((logits.double() / temperature).softmax(-1), labels)
    return {**result, "chosen": chosen, "validation": validation, "temperature": temperature}


# how a run's probabilities were made (keys of its "probabilities")
SOFTMAX = "softmax"
CALIBRATED = "softmax(f / T), T fitted on the out-of-fold outputs"
TEMPERATURE_SCALED = "softmax(f / T), T fitted on the held-out part"
PROBIT = "probit approximation of the Laplace GLM predictive"
PROBABILITY_METRICS = ("nll", "ece", "brier")


def _scores(probabilities: torch.Tensor, labels: torch.Tensor, made: str) -> dict:
    """Test accuracy and ``{"probabilities": {made: NLL, ECE, Brier}}`` of ``probabilities [N, K]``."""
    return {"accuracy": float((probabilities.argmax(-1) == labels).double().mean()),
            "probabilities": {made: probability_metrics(probabilities, labels)}}


def _choose(candidates: list[dict], score: Callable[[dict], tuple[float, float]]) -> tuple[dict, list[dict]]:
    """The candidate with the best held-out accuracy (ties: the lower held-out loss, then the first listed)."""
    validation = []
    for candidate in candidates:
        accuracy, loss = score(candidate)
        validation.append({**candidate, "accuracy": accuracy, "loss": loss})
    def rank(i: int) -> tuple[float, float, int]:  # a diverged run's NaN loss ranks last among equals
        loss = validation[i]["loss"]
        return -validation[i]["accuracy"], math.inf if math.isnan(loss) else loss, i

    best = min(range(len(candidates)), key=rank)
    return candidates[best], validation


def _accuracy_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``logits [N, K]`` against ``labels [N]``."""
    return float((logits.argmax(-1) == labels).double().mean()), float(F.cross_entropy(logits.double(), labels))
