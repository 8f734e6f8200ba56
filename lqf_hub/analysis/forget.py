"""Forgetting training images exactly: the optimum without them, as if they had never been seen.

An LQF model at its optimum is a function of its training set, its λ and its prior, nothing else (no data
order, no stopping time). So the model without images S is the optimum of the same objective over the
remaining images — computed here by the certified solver warm-started from the model's δ (close to the new
optimum when S is small), with the K-FAC prior rebuilt from the remaining images (M is a function of the
images: S must leave it too). λ stays the model's: choosing it again would be another model.
"""

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset, Subset

from ..modeling.model import LQFModel
from ..training.arguments import LQFTrainingArguments, objective_settings
from ..training.cache import TrunkCache
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
    rest = train_dataset.select(kept) if isinstance(train_dataset, TrunkCache) else Subset(train_dataset, kept)
    trainer = LQFTrainer(new, rest, None, args)
    record = trainer.train()[-1]
    source = {"train_data": model.training_summary["train_data"]} if "train_data" in model.training_summary else {}
    new.training_summary = {**new.training_summary, **source, "train_samples": len(kept),
                            "forgotten": {"removed": removed, "of": len(train_dataset),
                                          "seconds": time.perf_counter() - started}}
    trainer.save_model()
    return new, record
