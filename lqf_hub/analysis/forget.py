"""Forgetting training images exactly: the optimum without them, as if they had never been seen.

An LQF model at its optimum is a function of its training set, its λ and its prior, nothing else (no data
order, no stopping time). So the model without images S is the optimum of the same objective over the
remaining images — computed here by the certified solver warm-started from the model's δ (close to the new
optimum when S is small), with the K-FAC prior rebuilt from the remaining images (M is a function of the
images: S must leave it too; it is the model's own K-FAC less the share of S, a pass over S alone). λ stays the
model's: choosing it again would be another model.
"""

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..modeling.model import LQFModel
from ..training.arguments import LQFTrainingArguments, objective_settings
from ..training.cache import TrunkCache
from ..training.objective import Objective, trunk_outputs
from ..training.trainer import LQFTrainer


def forget(
    model: LQFModel, train_dataset: Dataset, remove: Sequence[int], args: LQFTrainingArguments,
) -> tuple[LQFModel, dict[str, Any]]:
    """The optimum of ``model``'s objective without the training images ``remove`` (indices into
    ``train_dataset``: the images the model was solved on, or their trunk outputs as a ``TrunkCache``), saved to
    ``args.output_dir/model``; ``model`` is left as it is. The objective (λ, prior, damping) is the model's; ``args`` gives the rest of the run.
    Returns the new model and the solver's record (certificate, iterations, seconds)."""
    removed = sorted(set(int(i) for i in remove))
    if not removed:
        raise ValueError("Nothing to forget: `remove` is empty.")
    if removed[0] < 0 or removed[-1] >= len(train_dataset):
        raise ValueError(f"`remove` holds {removed[0] if removed[0] < 0 else removed[-1]}, outside the "
                         f"{len(train_dataset)} training images (indices 0..{len(train_dataset) - 1}).")
    if len(removed) == len(train_dataset):
        raise ValueError("`remove` holds every training image; nothing would be left to fit.")
    if model.config.ridge is None or not model.config.ridge > 0:
        raise ValueError("Forgetting needs a model solved at a λ > 0 (`config.ridge`).")
    gone = set(removed)
    kept = [i for i in range(len(train_dataset)) if i not in gone]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as copy:  # a checked copy; a deep copy would share the backbone's segments
        model.save_pretrained(copy)
        new = LQFModel.from_pretrained(copy)
    args = dataclasses.replace(args, method="solve", ridge_grid=[model.config.ridge], warm_start=True,
                               **objective_settings(model.training_summary))
    rest, gone = (train_dataset.select(rows) if isinstance(train_dataset, TrunkCache) else Subset(train_dataset, rows)
                  for rows in (kept, removed))
    trainer = LQFTrainer(new, rest, None, args, curvature=_curvature_without(model, gone, len(train_dataset), args))
    record = trainer.train()[-1]
    source = {"train_data": model.training_summary["train_data"]} if "train_data" in model.training_summary else {}
    new.training_summary = {**new.training_summary, **source, "train_samples": len(kept),
                            "forgotten": {"removed": removed, "of": len(train_dataset),
                                          "seconds": time.perf_counter() - started}}
    trainer.save_model()
    return new, record


def _curvature_without(model: LQFModel, gone: Dataset, count: int, args: LQFTrainingArguments
                       ) -> dict[str, Tensor] | None:
    """K-FAC at w0 over the kept images: the model's own (its posterior's, over all ``count`` images) less the share
    of the images ``gone``, which costs a pass over them alone instead of one over the kept ones (``KFAC.remove``).
    None where the model carries no such posterior: the trainer then computes it from the kept images."""
    posterior = model.posterior
    if posterior is None or posterior.count != count or posterior.damping != args.damping:
        return None
    objective = Objective(model, trunk_outputs(model, gone, batch_size=args.eval_batch_size), args)
    return objective.kfac_without(posterior.curvature, count)
