"""Training LQF models with Accelerate: one CPU to many GPUs (``accelerate launch``).

The recipe of the paper: squared loss to α·one-hot targets with a ridge towards w0, gradients
preconditioned by K-FAC computed once at w0, SGD with momentum. The frozen trunk's outputs are computed
once and cached when the data is not augmented, so an epoch costs only the linearized tail.
``batch_size`` is the global batch: every process takes its slice, so results do not depend on the
number of processes.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .data import collate
from .errors import TrainingDiverged
from .kfac import KFAC, condition_number
from .loss import Loss, data_loss, ridge_penalty
from .curvature import hessian_vector_product, largest_eigenvalue
from .model import LQFModel

STATE_FILE = "trainer_state.json"


def process_state() -> PartialState:
    """This process's place in the run. Without an accelerator the processes must be asked to be CPU ones:
    otherwise accelerate (seen with 1.15) turns a multi-process `accelerate launch` on a CPU-only machine
    into N unconnected single-process runs."""
    return PartialState(cpu=not torch.accelerator.is_available())


@dataclass
class TrainingArguments:
    output_dir: str = field(default="lqf-output", metadata={"help": "Where checkpoints and metrics go."})
    epochs: int = field(default=10, metadata={"help": "Passes over the training set."})
    batch_size: int = field(default=32, metadata={"help": "Global batch size (split across processes)."})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size for evaluation and caching."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Step size; None: (1 - momentum) / the largest eigenvalue of the preconditioned mini-batch "
                         "Hessian (Lanczos)."},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)."})
    lr_schedule: str = field(default="cosine", metadata={"help": "'cosine' (decays to 0) or 'constant'."})
    preconditioner: str = field(default="kfac", metadata={"help": "'kfac' or 'none' (plain SGD, ablation)."})
    damping: float = field(
        default=1.0, metadata={"help": "K-FAC damping, relative to each block's mean eigenvalue (measured best 0.1-1)."}
    )
    kfac_batches: int = field(default=8, metadata={"help": "Batches used to estimate the curvature at w0."})
    kfac_outputs: str = field(
        default="auto", metadata={"help": "'exact' (one backward pass per class), 'sampled', or 'auto' (exact up to 32)."}
    )
    loss: str = field(default="mse", metadata={"help": "'mse' (LQF) or 'cross_entropy' (ablation)."})
    cache_trunk: bool = field(default=True, metadata={"help": "Cache the frozen trunk's outputs (no augmentation)."})
    cache_in_memory_gb: float = field(default=4.0, metadata={"help": "Larger caches go to a memory-mapped file."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16' (Accelerate)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and curvature sampling."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers when images are decoded per step."})
    divergence_factor: float = field(default=100.0, metadata={"help": "Stop if the loss exceeds this x the first."})
    report_to: str | None = field(default=None, metadata={"help": "Accelerate trackers ('all', 'tensorboard', ...)."})
    resume_from: str | None = field(default=None, metadata={"help": "A checkpoint directory to continue from."})
    eval_every: int = field(default=1, metadata={"help": "Evaluate every this many epochs (and the last)."})
    save_every: int = field(default=1, metadata={"help": "Checkpoint every this many epochs (and the last)."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (main process)."})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "kfac_batches", "gradient_accumulation_steps", "save_every",
                     "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0 (or None for automatic), got {self.learning_rate}.")
        Loss(self.loss)
        if self.preconditioner not in ("kfac", "none"):
            raise ValueError(f"`preconditioner` must be 'kfac' or 'none', got {self.preconditioner!r}.")
        if self.kfac_outputs not in ("auto", "exact", "sampled"):
            raise ValueError(f"`kfac_outputs` must be 'auto', 'exact' or 'sampled', got {self.kfac_outputs!r}.")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"`lr_schedule` must be 'cosine' or 'constant', got {self.lr_schedule!r}.")

    def fingerprint(self, model: LQFModel, num_train: int) -> str:
        """What a checkpoint must agree on to be resumed (not epochs, output or logging options)."""
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("epochs", "output_dir", "resume_from", "report_to", "progress", "num_workers",
                             "eval_batch_size", "cache_in_memory_gb", "save_every", "eval_every")}
        config = {k: v for k, v in model.config.to_dict().items() if k != "id2label"}
        blob = json.dumps({"args": keep, "config": config, "num_train": num_train}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _EpochPermutation(Sampler[int]):
    """A fresh permutation every epoch, from ``seed + epoch``: resumable and process-count independent."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _Indexed(Dataset):
    """Items with their index, so per-process results can be gathered back in order."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i]


def _collate_indexed(items):
    indices, rest = zip(*items)
    pixels, labels = collate(list(rest))
    return torch.tensor(indices), pixels, labels


class _Features(Dataset):
    """Rows of a trunk-output cache (in memory or memory-mapped) with their labels."""

    def __init__(self, values, labels: torch.Tensor) -> None:
        self.values, self.labels = values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.as_tensor(np.asarray(self.values[i])), self.labels[i]


class LQFTrainer:
    """Fit the δ of an :class:`LQFModel` on an image dataset (items ``{"pixel_values", "label"}``).

    ``inputs(split)`` gives what the model is fed (cached trunk outputs, computed once), ``features(split)``
    the pre-logit features at w0 (for linear probes on exactly the same data).
    """

    def __init__(
        self,
        model: LQFModel,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        args: TrainingArguments | None = None,
    ) -> None:
        self.model, self.train_dataset, self.eval_dataset = model, train_dataset, eval_dataset
        self.args = args or TrainingArguments()
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None and len(dataset) == 0:
                raise ValueError(f"`{name}` is empty; check the split and the --shots / filtering options.")
        self.accelerator = Accelerator(
            cpu=process_state().device.type == "cpu",
            mixed_precision=self.args.mixed_precision,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            log_with=self.args.report_to,
            project_dir=self.args.output_dir,
        )
        if self.args.batch_size % self.accelerator.num_processes:
            raise ValueError(
                f"batch_size={self.args.batch_size} must be divisible by the {self.accelerator.num_processes} processes."
            )
        self.output_dir = Path(self.args.output_dir)
        self.history: list[dict[str, Any]] = []
        self._inputs: dict[str, Dataset] = {}

    # ------------------------------------------------------------------------------------- train
    def train(self) -> list[dict[str, Any]]:
        """Run (or resume) training; returns one metrics dict per epoch."""
        args, acc = self.args, self.accelerator
        set_seed(args.seed)
        model = self.model.to(acc.device)
        fingerprint = args.fingerprint(model, len(self.train_dataset))
        start_epoch, self.history, learning_rate = self._check_resume(fingerprint)
        train_data = self.inputs("train")
        eval_data = None if self.eval_dataset is None else self.inputs("eval")

        outputs = args.kfac_outputs if args.kfac_outputs != "auto" else "exact" if model.num_classes <= 32 else "sampled"
        kfac = KFAC(
            model.linearization_point, model.linearized_parameters, ridge=model.config.ridge,
            damping=args.damping, outputs=outputs, seed=args.seed,
        ) if args.preconditioner == "kfac" else None
        if kfac is not None:
            acc.register_for_checkpointing(kfac)
        if not args.resume_from:
            batches = self._curvature_batches(train_data)
            if kfac is not None:
                for z in batches:
                    kfac.accumulate(model.tail_function(z), z.shape[0])
                kfac.finalize(lambda t: acc.reduce(t.to(acc.device), "sum"))
            learning_rate = args.learning_rate or self._step_size(kfac, batches)
        self.learning_rate = learning_rate
        optimizer = torch.optim.SGD(model.delta.parameters(), lr=learning_rate, momentum=args.momentum)
        # full batches only: a small last batch would weigh its samples more and destabilise momentum SGD
        loader = DataLoader(train_data, batch_size=min(args.batch_size, len(train_data)),
                            sampler=_EpochPermutation(len(train_data), args.seed),
                            collate_fn=self._collate, num_workers=args.num_workers, drop_last=True)
        total_steps = args.epochs * math.ceil(len(loader) / args.gradient_accumulation_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args.lr_schedule, total_steps))
        ddp_model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
        if args.resume_from:
            acc.load_state(args.resume_from)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not args.resume_from:
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            acc.init_trackers("lqf", config={k: str(v) for k, v in dataclasses.asdict(args).items()})

        first_loss = self.history[0]["train_loss_first_batch"] if self.history else None
        for epoch in range(start_epoch, args.epochs):
            loader.set_epoch(epoch)  # the prepared loader passes it on to the sampler; it would count from 0 on resume
            ddp_model.train()
            losses, started = [], time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not (args.progress and acc.is_main_process))
            for inputs, labels in bar:
                if not args.cache_trunk:
                    self._check_labels(labels, "train")
                with acc.accumulate(ddp_model):
                    logits = ddp_model(**inputs)
                    loss = data_loss(logits, labels, model.config.target_scale, Loss(args.loss))
                    total = loss + ridge_penalty(model.delta.values(), model.config.ridge)
                    acc.backward(total)
                    if acc.sync_gradients and kfac is not None:
                        kfac.precondition({n: d.grad for n, d in model.linearized_parameters.items()})
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                value = float(acc.reduce(total.detach(), "mean"))
                first_loss = first_loss if first_loss is not None else value
                self._guard(value, first_loss, epoch)
                losses.append(value)
                bar.set_postfix(loss=f"{value:.4f}")
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_loss_first_batch": first_loss,
                      "learning_rate": self.learning_rate, "seconds": time.perf_counter() - started}
            if kfac is not None and epoch == 0:
                record["kfac_condition_number"] = condition_number(kfac)
            last = epoch + 1 == args.epochs
            if eval_data is not None and ((epoch + 1) % args.eval_every == 0 or last):
                record.update({f"eval_{k}": v for k, v in self.evaluate(eval_data).items()})
            self._log(record)
            if (epoch + 1) % args.save_every == 0 or last:
                self._checkpoint(epoch + 1, fingerprint)
        if acc.is_main_process:
            plot_history(self.history, self.output_dir / "curves.png")
        for tracker in acc.trackers:  # not end_training(): it ends the process group that evaluate() still needs
            tracker.finish()
        return self.history

    # --------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Accuracy and MSE loss of the linearized model on ``dataset`` (default: the eval set)."""
        dataset = self.inputs("eval") if dataset is None else dataset
        acc, model = self.accelerator, self.model
        loader = acc.prepare_data_loader(DataLoader(dataset, batch_size=self.args.eval_batch_size,
                                                    collate_fn=self._collate, num_workers=self.args.num_workers))
        correct = count = loss_sum = 0.0
        for inputs, labels in loader:
            logits = model(**inputs)
            logits, labels = acc.gather_for_metrics((logits, labels))
            correct += float((logits.argmax(-1) == labels).sum())
            loss_sum += float(data_loss(logits, labels, model.config.target_scale)) * len(labels)
            count += len(labels)
        return {"accuracy": correct / count, "loss": loss_sum / count}

    # ---------------------------------------------------------------------------------- helpers
    def _collate(self, items):
        values, labels = collate(items)
        key = "trunk_output" if self.args.cache_trunk else "pixel_values"
        return {key: values}, labels

    def inputs(self, split: str) -> Dataset:
        """What the model is fed for ``split`` ("train" or "eval"): the cached trunk outputs (items
        ``(trunk_output, label)``) when ``cache_trunk`` is on, else the dataset itself. Computed once."""
        if split not in self._inputs:
            dataset = {"train": self.train_dataset, "eval": self.eval_dataset}[split]
            if dataset is None:
                raise ValueError("This trainer has no eval_dataset.")
            self._inputs[split] = self._cache(dataset, split) if self.args.cache_trunk else dataset
        return self._inputs[split]

    @torch.no_grad()
    def features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-logit features at w0 ``[N, D]`` and labels ``[N]`` of ``split`` (for linear probes)."""
        values, labels = [], []
        for inputs, batch_labels in DataLoader(self.inputs(split), batch_size=self.args.eval_batch_size,
                                               collate_fn=self._collate):
            values.append(self.model.features(**{k: v.to(self.accelerator.device) for k, v in inputs.items()}).cpu())
            labels.append(batch_labels)
        return torch.cat(values), torch.cat(labels)

    def _cache(self, dataset: Dataset, split: str) -> Dataset:
        """Trunk outputs of every item, computed once (split across processes, then gathered)."""
        acc, model = self.accelerator, self.model
        loader = acc.prepare_data_loader(DataLoader(_Indexed(dataset), batch_size=self.args.eval_batch_size,
                                                    collate_fn=_collate_indexed, num_workers=self.args.num_workers))
        values = labels = None
        for indices, pixels, batch_labels in tqdm(loader, desc=f"caching {split} trunk outputs",
                                                  disable=not (self.args.progress and acc.is_main_process)):
            z = model.encode_trunk(pixels.to(acc.device))
            indices, z, batch_labels = acc.gather_for_metrics((indices, z, batch_labels))
            host = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32).cpu().numpy()  # no bf16 in numpy
            if values is None:
                values = self._allocate(len(dataset), host.shape[1:], split, host.dtype)
                labels = torch.empty(len(dataset), dtype=torch.long)
            values[indices.cpu().numpy()] = host
            labels[indices.cpu()] = batch_labels.cpu()
        self._check_labels(labels, split)
        return _Features(values, labels)

    def _check_labels(self, labels: torch.Tensor, split: str) -> None:
        bad = labels[(labels < 0) | (labels >= self.model.num_classes)]
        if len(bad):
            raise ValueError(
                f"The {split} set has label {int(bad[0])}, outside 0..{self.model.num_classes - 1}; "
                f"the model has num_classes={self.model.num_classes}."
            )

    def _allocate(self, rows: int, shape: torch.Size, split: str, dtype) -> np.ndarray:
        size = rows * math.prod(shape) * np.dtype(dtype).itemsize
        if size <= self.args.cache_in_memory_gb * 2**30:
            return np.empty((rows, *shape), dtype=dtype)
        path = self.output_dir / "cache" / f"{split}-{os.getpid()}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, *shape))

    def _curvature_batches(self, train_data: Dataset) -> list[torch.Tensor]:
        """The first ``kfac_batches`` batches (fixed order) as trunk outputs: for K-FAC and the step size."""
        acc, model = self.accelerator, self.model
        loader = acc.prepare_data_loader(DataLoader(train_data, batch_size=min(self.args.batch_size, len(train_data)),
                                                    sampler=_EpochPermutation(len(train_data), self.args.seed + 10**6),
                                                    collate_fn=self._collate, drop_last=True))
        batches = []
        for inputs, _ in tqdm(loader, total=min(self.args.kfac_batches, len(loader)), desc="curvature at w0",
                              disable=not (self.args.progress and acc.is_main_process)):
            z = inputs.get("trunk_output")
            batches.append(model.encode_trunk(inputs["pixel_values"]) if z is None else z)
            if len(batches) == self.args.kfac_batches:
                break
        return batches

    def _step_size(self, kfac: KFAC | None, batches: list[torch.Tensor]) -> float:
        """``(1 − momentum) / λ``, λ the largest eigenvalue of the preconditioned *mini-batch* Hessian
        ``P^-½ H_b P^-½`` (Lanczos), maximised over a few batches.

        The objective is an exact quadratic, so its curvature sets the step. Without momentum a step of
        1/λ contracts on every batch (stable up to 2/λ), whatever the order of the batches; mini-batch
        curvature runs up to a few times the full-data one, so full-data curvature is not enough, and
        with momentum β the stochastic iteration needs the step scaled by (1 − β).
        """
        acc, model = self.accelerator, self.model
        reduce = (lambda t: acc.reduce(t, "mean")) if acc.num_processes > 1 else (lambda t: t)
        largest = 0.0
        for z in batches[: self._LANCZOS_BATCHES]:

            def operator(vector, z=z):
                vector = {n: v.clone() for n, v in vector.items()}
                if kfac is not None:
                    kfac.precondition(vector, power=0.5)
                product = hessian_vector_product(model, [z], vector, reduce)
                if kfac is not None:
                    kfac.precondition(product, power=0.5)
                return product

            largest = max(largest, largest_eigenvalue(operator, model.linearized_parameters, 10, self.args.seed))
        if not math.isfinite(largest) or largest <= 0:
            raise TrainingDiverged(f"The curvature estimate is {largest}; pass --learning-rate explicitly.")
        return (1.0 - self.args.momentum) / largest

    _LANCZOS_BATCHES = 2

    def _guard(self, loss: float, first: float, epoch: int) -> None:
        if not math.isfinite(loss) or loss > self.args.divergence_factor * max(first, 1e-12):
            kept = f" The checkpoint of epoch {epoch} is kept in {self.output_dir / 'checkpoints'}." if epoch else ""
            raise TrainingDiverged(
                f"Training diverged in epoch {epoch + 1}: loss {loss:.4g} (first batch {first:.4g}). "
                f"Lower --learning-rate (now {self.learning_rate:.3g}) or raise --damping (now {self.args.damping}).{kept}"
            )

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        acc = self.accelerator
        if not acc.is_main_process:
            return
        acc.log({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        summary = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "seconds")
        tqdm.write(f"epoch {record['epoch']}: {summary}")

    def _checkpoint(self, epoch: int, fingerprint: str) -> None:
        """Save the state after ``epoch``; keep this and the previous checkpoint."""
        directory = self.output_dir / "checkpoints" / f"epoch-{epoch}"
        self.accelerator.save_state(str(directory))
        if self.accelerator.is_main_process:
            state = {"epoch": epoch, "fingerprint": fingerprint, "learning_rate": self.learning_rate,
                     "history": self.history}
            (directory / STATE_FILE).write_text(json.dumps(state, indent=1))
            resumed = Path(self.args.resume_from).resolve() if self.args.resume_from else None
            previous = sorted((p for p in directory.parent.glob("epoch-*") if p != directory),
                              key=lambda p: int(p.name.split("-")[1]))
            for old in previous[:-1]:  # keep this and the previous checkpoint
                if old.resolve() != resumed:
                    shutil.rmtree(old)

    def _check_resume(self, fingerprint: str) -> tuple[int, list[dict[str, Any]], float | None]:
        if not self.args.resume_from:
            return 0, [], None
        state_file = Path(self.args.resume_from) / STATE_FILE
        if not state_file.exists():
            raise ValueError(f"{self.args.resume_from} is not an lqf-hub checkpoint (no {STATE_FILE}).")
        state = json.loads(state_file.read_text())
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"Checkpoint {self.args.resume_from} was written with another model config, training options or "
                "training set; resume with the same settings or start a new run in another --output-dir."
            )
        return state["epoch"], state["history"], state["learning_rate"]


def _schedule(kind: str, total_steps: int):
    if kind == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy curves per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in history if "eval_loss" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot([r["epoch"] for r in history], [r["train_loss"] for r in history], "o-", label="train")
    if evaluated:
        ax_loss.plot([r["epoch"] for r in evaluated], [r["eval_loss"] for r in evaluated], "o-", label="eval")
        ax_acc.plot([r["epoch"] for r in evaluated], [100 * r["eval_accuracy"] for r in evaluated], "o-", color="C1")
    ax_loss.set(xlabel="epoch", ylabel="loss (MSE to α·one-hot)", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="eval accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
