"""Checkpoints of LQF models: the layout on disk and on the Hub, validation before use, model cards.

A checkpoint directory holds ``config.json`` (the LQFConfig with everything needed to rebuild the backbone,
format version, training summary), ``model.safetensors`` and ``README.md`` (the model card). Tensors:
``base.<name>`` the linearization point of the backbone (parameters and buffers), ``head.weight`` /
``head.bias`` the new head at its linearization point, ``delta.<network name>`` the trained δ.
With ``base="reference"`` the ``base.*`` tensors are left out and the config records where the base
comes from and the sha256 of its weights instead; loading fetches the base and checks the hash.
Nothing is ever unpickled: weights are safetensors, configs JSON.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import torch
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import FORMAT_VERSION, LQFConfig
from .errors import CheckpointError

if TYPE_CHECKING:
    from .model import LQFModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_TEMPLATE = Path(__file__).parent / "model_cards" / "lqf.md"
BASES = ("full", "reference")


# ------------------------------------------------------------------------------------------- save
def save_checkpoint(model: "LQFModel", directory: str | os.PathLike, base: str = "full", repo_id: str | None = None) -> Path:
    """Write config, weights and card to ``directory`` atomically: a complete new checkpoint replaces
    the old one, or the old one stays untouched."""
    if base not in BASES:
        raise ValueError(f"`base` must be one of {BASES}, got {base!r}.")
    directory = Path(directory)
    config = checkpoint_config(model, base)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        metadata = {"format": "pt", "lqf_format_version": str(FORMAT_VERSION)}
        save_file(checkpoint_tensors(model, base), staging / WEIGHTS_FILE, metadata=metadata)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        model_card(model, config, repo_id or str(directory)).save(staging / "README.md")
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def checkpoint_config(model: "LQFModel", base: str) -> dict[str, Any]:
    from . import __version__

    if base == "reference" and not model.config.backbone.get("source"):
        raise ValueError(
            "base='reference' needs a backbone that can be fetched again (built by name or Hub repo id with "
            "pretrained weights); this one was passed as a model instance. Save with base='full'."
        )
    return {
        "library": "lqf-hub",
        "lqf_hub_version": __version__,
        "format_version": FORMAT_VERSION,
        "dtype": str(model.net.head.weight.dtype).removeprefix("torch."),
        "base": base,
        "base_sha256": backbone_sha256(model.net.backbone.state_dict()),
        "config": model.config.to_dict(),
        "training": model.training_summary,
    }


def backbone_sha256(state: Mapping[str, Tensor]) -> str:
    """A hash of the backbone's weights that does not depend on how they were stored: names, dtypes,
    shapes and bytes of every tensor, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_tensors(model: "LQFModel", base: str) -> dict[str, Tensor]:
    """The tensors a checkpoint stores (CPU, contiguous, no shared memory), by name."""
    tensors = {f"head.{k}": v for k, v in model.net.head.state_dict().items()}
    tensors.update({f"delta.{name}": d for name, d in model.linearized_parameters.items()})
    if base == "full":
        tensors.update({f"base.{k}": v for k, v in model.net.backbone.state_dict().items()})
    seen, unique = set(), {}
    for name, tensor in tensors.items():  # safetensors refuses tensors that share memory
        tensor = tensor.detach().cpu().contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        unique[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return unique


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


# ------------------------------------------------------------------------------------------- load
def resolve_files(
    source: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, force_download: bool = False,
) -> tuple[Path, Path]:
    """Paths of ``config.json`` and ``model.safetensors`` from a local directory or a Hub repo."""
    if os.path.isdir(source):
        config, weights = Path(source) / CONFIG_FILE, Path(source) / WEIGHTS_FILE
        for path in (config, weights):
            if not path.is_file():
                raise CheckpointError(f"{source} is not an lqf-hub checkpoint: {path.name} is missing.")
        return config, weights
    kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                  force_download=force_download)
    return _download(str(source), CONFIG_FILE, kwargs), _download(str(source), WEIGHTS_FILE, kwargs)


def _download(repo_id: str, filename: str, kwargs: dict[str, Any]) -> Path:
    try:
        return Path(hf_hub_download(repo_id, filename, **kwargs))
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"Cannot read the Hub repo {repo_id!r}: it does not exist, or it is private and no valid token was "
            "given (pass token=... or log in with `hf auth login`)."
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"The Hub repo {repo_id!r} has no revision {kwargs.get('revision')!r}.") from None
    except EntryNotFoundError:
        raise CheckpointError(f"The Hub repo {repo_id!r} is not an lqf-hub checkpoint: no {filename}.") from None


def read_config(path: Path) -> tuple[dict[str, Any], LQFConfig]:
    """The checkpoint's config.json, validated, and the LQFConfig in it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or data.get("library") != "lqf-hub":
        raise CheckpointError(f"{path} was not written by lqf-hub (no \"library\": \"lqf-hub\").")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}, newer than this lqf-hub understands ({FORMAT_VERSION}); "
            "upgrade with `pip install -U lqf-hub`."
        )
    if data.get("base") not in BASES:
        raise CheckpointError(f"{path}: `base` must be one of {BASES}, got {data.get('base')!r}.")
    try:
        config = LQFConfig.from_dict(data["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds an invalid LQFConfig: {err}") from None
    return data, config


def read_tensors(path: Path, expected: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Check the safetensors header against ``expected`` (name -> shape), then load the tensors."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            if int((handle.metadata() or {}).get("lqf_format_version", "0")) > FORMAT_VERSION:
                raise CheckpointError(f"{path} was written by a newer lqf-hub; upgrade with `pip install -U lqf-hub`.")
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({err}).") from None
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(n for n in set(expected) & set(shapes) if tuple(expected[n]) != shapes[n])
    problems = [f"missing {missing[:5]}"] if missing else []
    problems += [f"unexpected {unexpected[:5]}"] if unexpected else []
    problems += [f"{n} has shape {list(shapes[n])}, expected {list(expected[n])}" for n in wrong[:5]]
    if problems:
        raise CheckpointError(f"{path} does not match its config: " + "; ".join(problems) + ".")
    try:
        return load_file(str(path))
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err}).") from None


# ------------------------------------------------------------------------------------------- card
def model_card(model: "LQFModel", config: Mapping[str, Any], repo_id: str) -> ModelCard:
    """The model card: Hub metadata (with model-index results when metrics are known) and usage."""
    from huggingface_hub import EvalResult

    lqf = model.config
    training = model.training_summary or {}
    dataset, metrics = training.get("dataset"), training.get("metrics", {})
    results = [
        EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                   dataset_split=training.get("eval_split", "test"), metric_type=name, metric_value=value)
        for name, value in metrics.items() if dataset
    ]
    source = lqf.backbone.get("source") or {}
    card_data = ModelCardData(
        library_name="lqf-hub", tags=["lqf", "linearized", "image-classification"], pipeline_tag="image-classification",
        base_model=source.get("hub_id"), datasets=[dataset] if dataset and "/" in dataset else None,
        eval_results=results or None, model_name=training.get("name", "LQF model"), license=training.get("license"),
    )
    settings = {
        "backbone": lqf.backbone_name,
        "linearized": lqf.linearize, "activation": lqf.activation, "leaky slope": lqf.leaky_slope,
        "target scale α": lqf.target_scale, "ridge λ": lqf.ridge, "head init": lqf.head_init,
        "classes": lqf.num_classes, "weights stored": "full (base + delta)" if config["base"] == "full"
        else f"delta only; base sha256 {config['base_sha256'][:16]}…",
    }
    return ModelCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE), settings=settings, metrics=metrics, training=training,
        labels=list((lqf.id2label or {}).values()), repo_id=repo_id,
    )
