"""Checkpoints on disk and on the Hugging Face Hub: the format (config.json + model.safetensors, validated before
use, never unpickled) and the model card."""

from .card import model_card
from .format import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    backbone_sha256,
    check_exists_or_repo_id,
    load_checkpoint,
    locate_checkpoint,
    push_checkpoint,
    read_config,
    resolve_files,
    save_checkpoint,
)
from .protocol import Checkpointable

__all__ = [
    "CARD_FILE", "CONFIG_FILE", "Checkpointable", "WEIGHTS_FILE", "backbone_sha256", "check_exists_or_repo_id",
    "load_checkpoint", "locate_checkpoint", "model_card", "push_checkpoint", "read_config", "resolve_files",
    "save_checkpoint",
]
