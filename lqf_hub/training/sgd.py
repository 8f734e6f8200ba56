"""The trainer's SGD loop (``method="sgd"``): K-FAC-preconditioned momentum SGD, stopped after ``epochs``.

The paper's recipe, kept for what the solver cannot do: augmentation on the fly (no trunk cache) and data
too large to cache. It is early-stopped — the result depends on epochs, schedule and damping — while
``method="solve"`` reaches the one optimum. K-FAC is computed once at w0 from the first ``kfac_batches``
batches; the step size follows from the preconditioned curvature (a step that cannot diverge).
"""

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..errors import TrainingDiverged
from ..modeling.loss import Loss, data_loss, ridge_penalty
from ..modeling.model import LQFModel
from ..plotting import save_png, subplots
from ..solver.curvature import preconditioned_curvature
from ..solver.kfac import KFAC, condition_number
from .arguments import KFACOutputs, LQFTrainingArguments, Preconditioner, Schedule
from .state import TrainerState


class LoopHost(Protocol):
    """What the loop uses of the trainer that runs it (``LQFTrainer``): its model, data, and where it reports."""

    model: LQFModel
    args: LQFTrainingArguments
    accelerator: Accelerator
    history: list[dict[str, Any]]
    output_dir: Path

    def inputs(self, split: str) -> Dataset: ...
    def collate(self, items: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...
    def check_labels(self, labels: torch.Tensor, split: str) -> None: ...
    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]: ...
    def kfac(self, ridge: float, saved: dict[str, torch.Tensor],
             batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor | None]]], outputs: str, seed: int) -> KFAC: ...
    def start_log(self) -> None: ...
    def log(self, record: dict[str, Any]) -> None: ...
    def checkpoint(self, name: str, state: TrainerState, tensors: dict[str, torch.Tensor]) -> None: ...


class EpochPermutation(Sampler[int]):
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


class SGDLoop:
    """``trainer``'s SGD loop; ``run`` reports one record per epoch through ``trainer.log``."""

    def __init__(self, trainer: LoopHost) -> None:
        self.trainer = trainer
        self.learning_rate: float | None = None
        self._batches: list[torch.Tensor] | None = None  # the curvature batches, trunk outputs

    def run(self, train_data: Dataset, eval_data: Dataset | None, settings: str, data: str,
            saved: dict[str, torch.Tensor], resumed: TrainerState | None) -> None:
        trainer = self.trainer
        args, acc, model = trainer.args, trainer.accelerator, trainer.model
        kfac = self._preconditioner(saved)
        self.learning_rate = resumed.learning_rate if resumed else args.learning_rate or self._step_size(kfac)
        optimizer = torch.optim.SGD(model.delta.parameters(), lr=self.learning_rate, momentum=args.momentum)
        # full batches only: a small last batch would weigh its samples more and destabilise momentum SGD
        loader = DataLoader(train_data, batch_size=min(args.batch_size, len(train_data)),
                            sampler=EpochPermutation(len(train_data), args.seed),
                            collate_fn=trainer.collate, num_workers=args.num_workers, drop_last=True)
        start_epoch, step = 0, 0
        if resumed is not None:
            start_epoch, step = resumed.epoch, resumed.step  # the trainer has restored its history
            _restore(model, optimizer, saved)
        ddp_model, prepared_optimizer, loader = acc.prepare(model, optimizer, loader)
        trainer.start_log()
        total_steps = args.epochs * math.ceil(len(loader) / args.gradient_accumulation_steps)
        first_loss = trainer.history[0]["train_loss_first_batch"] if trainer.history else None
        for epoch in range(start_epoch, args.epochs):
            loader.set_epoch(epoch)  # the prepared loader passes it on to the sampler; it would count from 0 on resume
            ddp_model.train()
            losses, started = [], time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not (args.progress and acc.is_main_process))
            for inputs, labels in bar:
                if not args.cache_trunk:
                    trainer.check_labels(labels, "train")
                with acc.accumulate(ddp_model):
                    logits = ddp_model(**inputs)
                    loss = data_loss(logits, labels, model.config.target_scale, Loss(args.loss))
                    total = loss + ridge_penalty(model.delta.values(), model.config.ridge)
                    acc.backward(total)
                    if acc.sync_gradients:
                        if kfac is not None:
                            kfac.precondition({n: d.grad for n, d in model.linearized_parameters.items()})
                        for group in optimizer.param_groups:
                            group["lr"] = self.learning_rate * _schedule(args.lr_schedule, step, total_steps)
                        step += 1
                    prepared_optimizer.step()
                    prepared_optimizer.zero_grad(set_to_none=True)
                value = float(acc.reduce(total.detach(), "mean"))
                first_loss = first_loss if first_loss is not None else value
                self._guard(value, first_loss, epoch)
                losses.append(value)
                bar.set_postfix(loss=f"{value:.4f}")
            record = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "train_loss_first_batch": first_loss,
                      "learning_rate": self.learning_rate, "seconds": time.perf_counter() - started}
            if kfac is not None and epoch == 0:
                record["kfac_condition_number"] = condition_number(kfac)
            last = epoch + 1 == args.epochs
            if eval_data is not None and ((epoch + 1) % args.eval_every == 0 or last):
                record.update({f"eval_{k}": v for k, v in trainer.evaluate(eval_data).items()})
            trainer.log(record)
            if (epoch + 1) % args.save_every == 0 or last:
                trainer.checkpoint(f"epoch-{epoch + 1}",
                                    TrainerState(epoch + 1, step, self.learning_rate, settings, data, trainer.history),
                                    _state_tensors(model, optimizer, kfac))
        if acc.is_main_process:
            plot_history(trainer.history, trainer.output_dir / "curves.png")

    def _preconditioner(self, saved: dict[str, torch.Tensor]) -> KFAC | None:
        """K-FAC at w0 from the first ``kfac_batches`` batches."""
        args, model = self.trainer.args, self.trainer.model
        if args.preconditioner == Preconditioner.NONE.value:
            return None
        outputs = args.kfac_outputs if args.kfac_outputs != KFACOutputs.AUTO.value else "exact" if model.num_classes <= 32 else "sampled"
        return self.trainer.kfac(model.config.ridge, saved, lambda: ((z, None) for z in self._curvature_batches()),
                                  outputs, seed=args.seed)

    def _curvature_batches(self) -> list[torch.Tensor]:
        """The first ``kfac_batches`` batches (fixed order) as trunk outputs: for K-FAC and the step size."""
        trainer = self.trainer
        args, acc, model, train_data = trainer.args, trainer.accelerator, trainer.model, trainer.inputs("train")
        if self._batches is None:
            loader = acc.prepare_data_loader(DataLoader(
                train_data, batch_size=min(args.batch_size, len(train_data)), collate_fn=trainer.collate,
                sampler=EpochPermutation(len(train_data), args.seed + 10**6), drop_last=True))
            self._batches = []
            for inputs, _ in tqdm(loader, total=min(args.kfac_batches, len(loader)), desc="curvature at w0",
                                  disable=not (args.progress and acc.is_main_process)):
                z = inputs.get("trunk_output")
                self._batches.append(model.encode_trunk(inputs["pixel_values"]) if z is None else z)
                if len(self._batches) == args.kfac_batches:
                    break
        return self._batches

    def _step_size(self, kfac: KFAC | None) -> float:
        args, acc = self.trainer.args, self.trainer.accelerator
        reduce = (lambda t: acc.reduce(t, "mean")) if acc.num_processes > 1 else (lambda t: t)
        largest = preconditioned_curvature(self.trainer.model, self._curvature_batches()[:2], kfac, reduce, args.seed)
        if not math.isfinite(largest) or largest <= 0:
            raise TrainingDiverged(f"The curvature estimate is {largest}; pass --learning-rate explicitly.")
        # with momentum β the stochastic iteration needs the step of plain SGD scaled by (1 − β)
        return (1.0 - args.momentum) / largest

    def _guard(self, loss: float, first: float, epoch: int) -> None:
        args = self.trainer.args
        if not math.isfinite(loss) or loss > args.divergence_factor * max(first, 1e-12):
            checkpoints = self.trainer.output_dir / "checkpoints"
            kept = f" The checkpoint of epoch {epoch} is kept in {checkpoints}." if epoch else ""
            raise TrainingDiverged(
                f"Training diverged in epoch {epoch + 1}: loss {loss:.4g} (first batch {first:.4g}). "
                f"Lower --learning-rate (now {self.learning_rate:.3g}) or raise --damping (now {args.damping}).{kept}"
            )


def _state_tensors(model: LQFModel, optimizer: torch.optim.SGD, kfac: KFAC | None) -> dict[str, torch.Tensor]:
    """Everything a resumed run needs as tensors: δ, momentum buffers, K-FAC."""
    tensors = {}
    for name, delta in model.linearized_parameters.items():
        tensors[f"delta/{name}"] = delta.detach()
        buffer = optimizer.state.get(delta, {}).get("momentum_buffer")
        if buffer is not None:
            tensors[f"momentum/{name}"] = buffer
    if kfac is not None:
        tensors.update({f"kfac/{k}": v for k, v in kfac.state_dict().items()})
    return tensors


def _restore(model: LQFModel, optimizer: torch.optim.SGD, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, delta in model.linearized_parameters.items():
            delta.copy_(tensors[f"delta/{name}"])
            if f"momentum/{name}" in tensors:
                optimizer.state[delta]["momentum_buffer"] = tensors[f"momentum/{name}"].to(delta)


def _schedule(kind: str, step: int, total_steps: int) -> float:
    """Factor of the step size at optimizer step ``step`` (0-based)."""
    if kind == Schedule.CONSTANT.value:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy curves per epoch as a PNG (written atomically)."""
    evaluated = [r for r in history if "eval_loss" in r]
    fig, (ax_loss, ax_acc) = subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot([r["epoch"] for r in history], [r["train_loss"] for r in history], "o-", label="train")
    if evaluated:
        ax_loss.plot([r["epoch"] for r in evaluated], [r["eval_loss"] for r in evaluated], "o-", label="eval")
        ax_acc.plot([r["epoch"] for r in evaluated], [100 * r["eval_accuracy"] for r in evaluated], "o-", color="C1")
    ax_loss.set(xlabel="epoch", ylabel="loss (MSE to α·one-hot)", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="eval accuracy")
    save_png(fig, path)
