"""How an ``lqf_hub.LQFTrainer`` runs: one dataclass, which the command line turns into options."""

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import _choice
from ..modeling.loss import Loss

if TYPE_CHECKING:
    from ..modeling.model import LQFModel


class Method(str, enum.Enum):
    SOLVE = "solve"  # the certified optimum, λ chosen on held-out training images
    SGD = "sgd"  # the early-stopped, preconditioned SGD loop (augmentation, data too large to cache)


class Prior(str, enum.Enum):
    AUTO = "auto"  # the three below, the one of lower cross-validated loss kept
    KFAC = "kfac"  # (λ/2) δᵀMδ with M the damped K-FAC curvature at w0
    ISOTROPIC = "isotropic"  # (λ/2) ‖δ‖²
    HEAD = "head"  # LQF-head: (λ/2) ‖δ_head‖², the backbone's δ held at zero


class Rule(str, enum.Enum):
    CROSS_VALIDATION = "cross-validation"  # raced K-fold cross-validation over the training images
    EVIDENCE = "evidence"  # the marginal likelihood of the linear-Gaussian model, over all the training images


class Schedule(str, enum.Enum):
    COSINE = "cosine"  # decays to 0 over the run
    CONSTANT = "constant"


class Preconditioner(str, enum.Enum):
    KFAC = "kfac"
    NONE = "none"  # plain SGD (ablation)


class KFACOutputs(str, enum.Enum):
    AUTO = "auto"  # SGD preconditioner: exact up to 32 classes, sampled above; solver prior: sampled
    EXACT = "exact"  # one backward pass per class
    SAMPLED = "sampled"  # one Gaussian output vector per sample


class CacheDtype(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"  # half the memory; outputs beyond ±65504 are refused


class MixedPrecision(str, enum.Enum):
    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


class SavedBase(str, enum.Enum):
    FULL = "full"  # the linearization point is stored with δ
    REFERENCE = "reference"  # δ and the head only, plus the base's id and sha256


@dataclass
class LQFTrainingArguments:
    """How an ``LQFTrainer`` runs. The command line (``lqf-hub train``) offers every field as an option."""

    output_dir: str = field(default="lqf-output", metadata={"help": "Where the model, metrics and checkpoints go."})
    method: str = field(
        default=Method.SOLVE.value,
        metadata={"help": "'solve': the certified optimum, λ chosen by cross-validation on the training images; 'sgd': the "
                          "early-stopped preconditioned SGD loop (for augmentation or data too large to cache).",
                  "choices": Method},
    )
    prior: str = field(
        default="auto",
        metadata={"help": "Shape of the ridge (λ/2)δᵀMδ of 'solve': 'kfac' (M: K-FAC curvature at w0 with "
                          "--damping), 'isotropic' (M = I), 'head' (LQF-head: M = I on the new head, the backbone "
                          "kept at w0), or 'auto': the one of lower cross-validated loss, chosen with λ.",
                  "choices": Prior},
    )
    ridge_grid: list[float] = field(
        default_factory=lambda: [1000.0, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1],
        metadata={"help": "λ values 'solve' chooses from by cross-validation (one value: no choice of λ). With "
                          "the K-FAC prior λ = 1 weighs the prior as much as the data."},
    )
    select: str = field(
        default=Rule.CROSS_VALIDATION.value,
        metadata={"help": "How 'solve' chooses the prior and λ: 'cross-validation' (raced K-fold, every image scored by "
                          "a model that did not see it; fits the temperature) or 'evidence' (the marginal likelihood "
                          "over all the images: no image held out, no temperature; it chose worse on the validation "
                          "suite, see docs/probabilities.md).",
                  "choices": Rule},
    )
    validation_folds: int = field(
        default=5, metadata={"help": "Folds of the cross-validation that chooses λ and the prior (one Krylov path "
                                     "per fold and prior; at most one fold per training image)."}
    )
    tolerance: float = field(
        default=1e-4, metadata={"help": "'solve' stops when the relative gradient norm is below this."}
    )
    warm_start: bool = field(
        default=False, metadata={"help": "'solve' starts from the model's δ instead of zero (forgetting a few "
                                         "images: the old optimum is close to the new one)."}
    )
    max_iterations: int = field(
        default=300, metadata={"help": "Most products with the curvature (passes over the data) per solve."}
    )
    epochs: int = field(default=10, metadata={"help": "Passes over the training set."})
    batch_size: int = field(default=32, metadata={"help": "Global batch size (split across processes)."})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size for evaluation and caching."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Step size; unset: (1 - momentum) / the largest eigenvalue of the preconditioned "
                          "mini-batch Hessian (Lanczos)."},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)."})
    lr_schedule: str = field(default="cosine", metadata={"help": "Step-size schedule.", "choices": Schedule})
    preconditioner: str = field(default="kfac", metadata={"help": "Gradient preconditioner.", "choices": Preconditioner})
    damping: float = field(
        default=1.0, metadata={"help": "K-FAC damping, relative to each block's mean eigenvalue."}
    )
    kfac_batches: int = field(default=8, metadata={"help": "Batches used to estimate the curvature at w0."})
    kfac_outputs: str = field(
        default="auto", metadata={"help": "How K-FAC back-propagates the outputs.", "choices": KFACOutputs}
    )
    loss: str = field(default="mse", metadata={"help": "'mse' (LQF) or 'cross_entropy' (ablation).", "choices": Loss})
    cache_trunk: bool = field(default=True, metadata={"help": "Cache the frozen trunk's outputs (no augmentation)."})
    cache_in_memory_gb: float = field(default=4.0, metadata={"help": "Larger caches go to a memory-mapped file."})
    cache_dtype: str = field(
        default="float32",
        metadata={"help": "How the trunk outputs are stored: 'float16' halves their memory (each batch is computed "
                          "with in the model's dtype; the objective is that of the stored values).",
                  "choices": CacheDtype},
    )
    mixed_precision: str = field(default="no", metadata={"help": "Accelerate mixed precision.", "choices": MixedPrecision})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and curvature sampling."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers when images are decoded per step."})
    divergence_factor: float = field(default=100.0, metadata={"help": "Stop if the loss exceeds this x the first."})
    report_to: str | None = field(default=None, metadata={"help": "Accelerate trackers ('all', 'tensorboard', ...)."})
    resume_from: str | None = field(default=None, metadata={"help": "A checkpoint directory to continue from."})
    eval_every: int = field(default=1, metadata={"help": "Evaluate every this many epochs (and the last)."})
    save_every: int = field(default=1, metadata={"help": "Checkpoint every this many epochs (and the last)."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (main process)."})
    save_base: str = field(
        default="full", metadata={"help": "What the saved model stores besides delta and head.", "choices": SavedBase}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model to the Hugging Face Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo to push to, e.g. user/my-lqf-model (default: output_dir's name)."}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in user's)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Name of the dataset, for the model card."})
    eval_split_name: str = field(default="eval", metadata={"help": "Name of the evaluation split, for the model card."})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                setattr(self, f.name, _choice(f.metadata["choices"], f.name, getattr(self, f.name)).value)
        for name in ("epochs", "batch_size", "eval_batch_size", "kfac_batches", "gradient_accumulation_steps",
                     "save_every", "eval_every", "max_iterations"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0 (or None for automatic), got {self.learning_rate}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum}.")
        if not self.damping >= 0:
            raise ValueError(f"`damping` must be >= 0, got {self.damping}.")
        if not self.ridge_grid or not all(r > 0 for r in self.ridge_grid):
            raise ValueError(f"`ridge_grid` must hold values > 0, got {self.ridge_grid}.")
        if self.validation_folds < 2:
            raise ValueError(f"`validation_folds` must be >= 2, got {self.validation_folds}.")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"`tolerance` must be in (0, 1), got {self.tolerance}.")
        if self.method == Method.SOLVE.value and self.prior != Prior.ISOTROPIC.value and not self.damping > 0:
            raise ValueError("The K-FAC prior needs `damping` > 0 (its metric would be singular).")

    def settings_fingerprint(self, model: "LQFModel") -> str:
        """What a checkpoint must agree on to be resumed: the optimisation and the model, not the run's length,
        output or logging."""
        ignored = {"epochs", "output_dir", "resume_from", "report_to", "progress", "num_workers", "eval_batch_size",
                   "cache_in_memory_gb", "save_every", "eval_every", "save_base", "push_to_hub", "hub_model_id",
                   "hub_private_repo", "hub_token", "dataset_name", "eval_split_name", "tolerance", "max_iterations",
                   "warm_start"}
        kept = {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}
        config = {k: v for k, v in model.config.to_dict().items() if k != "id2label"}
        blob = json.dumps({"args": kept, "config": config}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def objective_settings(training_summary: dict[str, Any]) -> dict[str, Any]:
    """The training arguments that, with its λ, define a solved model's objective — its prior, damping, K-FAC
    outputs and how the trunk outputs were stored — read from its training summary (the card's record)."""
    if training_summary.get("prior") not in (Prior.KFAC.value, Prior.ISOTROPIC.value, Prior.HEAD.value):
        raise ValueError("The model's card does not record the prior it was solved with: only models trained "
                         "with method='solve' can be explained or made to forget.")
    return {"prior": training_summary["prior"],
            "damping": training_summary.get("damping", LQFTrainingArguments.damping),
            "kfac_outputs": training_summary.get("kfac_outputs", LQFTrainingArguments.kfac_outputs),
            "cache_dtype": training_summary.get("cache_dtype", LQFTrainingArguments.cache_dtype)}
