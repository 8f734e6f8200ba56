"""The trainer's resumable state: tensors in safetensors, the rest in JSON; nothing is ever unpickled.

A checkpoint directory (``OUTPUT/checkpoints/epoch-N`` of the SGD loop, ``OUTPUT/checkpoints/selection``
of the solver) holds ``trainer_state.safetensors`` (δ, momentum buffers, the K-FAC eigenbases:
``delta/<name>``, ``momentum/<name>``, ``kfac/<key>``) and
``trainer_state.json`` (epoch, optimizer step, step size, fingerprints of the settings and of the training
set, the metrics history, the solver's chosen λ and path). Both are written into a staging directory that replaces the checkpoint in one
rename, so a run killed at any moment leaves complete checkpoints only.
"""

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import CheckpointError
from ..files import atomic_directory

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.safetensors"
STATE_VERSION = 1


@dataclass
class TrainerState:
    """Where a run stands: after a completed epoch (SGD), or after choosing λ (the solver)."""

    epoch: int
    step: int  # optimizer steps taken (the schedule's position)
    learning_rate: float | None
    settings_fingerprint: str
    data_fingerprint: str
    history: list[dict[str, Any]]
    selection: dict[str, Any] | None = None  # the solver's chosen λ and its path


def save_trainer_checkpoint(directory: Path, tensors: dict[str, Tensor], state: TrainerState) -> None:
    """Write ``tensors`` and ``state`` to ``directory``, replacing it atomically."""
    with atomic_directory(directory) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / TENSORS_FILE,
                  metadata={"format": "pt"})
        record = {"version": STATE_VERSION, **dataclasses.asdict(state)}
        (staging / STATE_FILE).write_text(json.dumps(record, indent=1))


def load_trainer_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Tensor], TrainerState]:
    """Read a checkpoint written by ``save_trainer_checkpoint``; every file is validated before use."""
    directory = Path(directory)
    state_file, tensors_file = directory / STATE_FILE, directory / TENSORS_FILE
    for path in (state_file, tensors_file):
        if not path.is_file():
            raise CheckpointError(
                f"{directory} is not an lqf-hub training checkpoint ({path.name} is missing); resume from one of "
                "OUTPUT_DIR/checkpoints/epoch-N."
            )
    try:
        record = json.loads(state_file.read_text())
        version = record.pop("version")
        state = TrainerState(**record)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{state_file} is corrupt or from another program ({err}).") from None
    if version > STATE_VERSION:
        raise CheckpointError(f"{state_file} was written by a newer lqf-hub; upgrade with `pip install -U lqf-hub`.")
    try:
        tensors = load_file(str(tensors_file))
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(f"{tensors_file} is truncated or corrupt ({err}).") from None
    return tensors, state


def prune_checkpoints(parent: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the ``keep`` newest ``epoch-N`` checkpoints under ``parent`` (never ``protect``)."""
    found = sorted((p for p in parent.glob("epoch-*") if p.name.split("-")[1].isdigit()),
                   key=lambda p: int(p.name.split("-")[1]))
    for old in found[:-keep]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old)
