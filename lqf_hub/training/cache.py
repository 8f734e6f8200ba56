"""The trunk-output cache: the frozen part of the network runs once per image, not once per epoch.

Everything before the first linearized parameter is constant, so its outputs are computed once (split
across processes, gathered back in order) and kept in memory or in a memory-mapped file. The cache also
fingerprints what it saw — a sha256 over every image's pixels and label, in order — so a resumed run
can tell that it is fed the same training set, whatever the number of processes.
"""

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import collate
from ..files import load_keyed_tensors, save_keyed_tensors
from ..modeling.model import LQFModel


class TrunkCache(Dataset):
    """Rows ``(trunk_output, label)`` of a dataset, computed once. ``values [N, ...]``, ``labels [N]``,
    ``digests [N, 32]`` (uint8): sha256 of each image's pixels and label, so that choices made on the set
    (a held-out split) need not depend on its order; ``fingerprint``: sha256 hex of them all, in order."""

    def __init__(self, values: np.ndarray, labels: torch.Tensor, digests: torch.Tensor) -> None:
        self.values, self.labels, self.digests = values, labels, digests
        self.fingerprint = digests_fingerprint(digests)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(np.asarray(self.values[i])), self.labels[i]

    def select(self, indices: Sequence[int]) -> "TrunkCache":
        """The rows ``indices``, in that order, as a cache of their own (in memory)."""
        rows = np.asarray(indices, dtype=np.int64)
        return TrunkCache(np.asarray(self.values[rows]), self.labels[rows], self.digests[rows])

    def save(self, path: str | os.PathLike, key: str) -> None:
        """Write it atomically as safetensors, with ``key`` (a digest of what it was computed from)."""
        save_keyed_tensors(path, {"values": torch.from_numpy(np.ascontiguousarray(self.values)), "labels": self.labels,
                                  "digests": self.digests}, key)

    @classmethod
    def load(cls, path: str | os.PathLike, key: str) -> "TrunkCache | None":
        """The cache saved at ``path`` if it was computed from ``key`` and is whole; None if absent, stale or
        unreadable."""
        saved = load_keyed_tensors(path, key, ("values", "labels", "digests"))
        if saved is None or not len(saved[0]["values"]) == len(saved[0]["labels"]) == len(saved[0]["digests"]):
            return None
        return cls(saved[0]["values"].numpy(), saved[0]["labels"], saved[0]["digests"])


@torch.no_grad()
def cache_trunk_outputs(
    model: LQFModel, dataset: Dataset, accelerator: Accelerator | None, *, batch_size: int, num_workers: int = 0,
    name: str = "train", memory_limit_gb: float = 4.0, spill_dir: Path | None = None, progress: bool = True,
    dtype: str = "float32",
) -> TrunkCache:
    """Run the frozen trunk over every item of ``dataset`` (items ``{"pixel_values", "label"}``) once, split over
    ``accelerator``'s processes (None: this process alone, on the model's device).

    Caches larger than ``memory_limit_gb`` go to a memory-mapped ``spill_dir/<name>-<pid>.npy``. ``dtype``:
    "float32" (float64 outputs stay float64) or "float16" (half the memory; outputs beyond its range are refused).
    """
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, collate_fn=_collate_indexed, num_workers=num_workers)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    main = accelerator is None or accelerator.is_main_process
    values = labels = digests = None
    for indices, pixels, batch_labels in tqdm(loader, desc=f"caching {name} trunk outputs", disable=not (progress and main)):
        z = model.encode_trunk(pixels.to(device))
        item_digests = _item_digests(pixels, batch_labels).to(device)
        if accelerator is not None:
            indices, z, batch_labels, item_digests = accelerator.gather_for_metrics((indices, z, batch_labels, item_digests))
        host = z.to(_storage_dtype(z.dtype, dtype)).cpu()  # numpy has no bfloat16
        if dtype == "float16" and not bool(torch.isfinite(host).all()) and bool(torch.isfinite(z).all()):
            raise ValueError(f"The trunk outputs reach {float(z.abs().max()):.3g}, beyond float16's range (65504): "
                             "store them with cache_dtype='float32' (--cache-dtype float32).")
        host = host.numpy()
        if values is None:
            values = _allocate(len(dataset), host.shape[1:], host.dtype, memory_limit_gb, spill_dir, name)
            labels = torch.empty(len(dataset), dtype=torch.long)
            digests = torch.empty(len(dataset), item_digests.shape[1], dtype=torch.uint8)
        rows = indices.cpu()
        values[rows.numpy()] = host
        labels[rows] = batch_labels.cpu()
        digests[rows] = item_digests.cpu()
    return TrunkCache(values, labels, digests)


def _storage_dtype(computed: torch.dtype, dtype: str) -> torch.dtype:
    if dtype == "float16":
        return torch.float16
    if dtype != "float32":
        raise ValueError(f"The trunk cache's dtype must be 'float32' or 'float16', got {dtype!r}.")
    return torch.float64 if computed == torch.float64 else torch.float32


def dataset_fingerprint(dataset: Dataset) -> str:
    """A fingerprint of a dataset that is read item by item (no cache): a Hugging Face dataset's own
    fingerprint (it changes with every selection or map), else the class name and length."""
    own = getattr(dataset, "_fingerprint", None)
    return own if own else f"{type(dataset).__name__}:{len(dataset)}"


def content_digests(dataset: Dataset) -> torch.Tensor:
    """The digests a ``TrunkCache`` of ``dataset`` would hold, without running the trunk: ``[N, 32]``
    uint8 (for splits that depend on the images, not their order, and to check a rebuilt training set)."""
    digests = [_item_digests(pixels, labels) for pixels, labels in DataLoader(dataset, batch_size=256, collate_fn=collate)]
    return torch.cat(digests) if digests else torch.empty(0, 32, dtype=torch.uint8)


def digests_fingerprint(digests: torch.Tensor) -> str:
    """The fingerprint of a training set from its items' digests ``[N, 32]``, in order: sha256 hex."""
    return hashlib.sha256(digests.numpy().tobytes()).hexdigest()


def _item_digests(pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sha256 of each image's bytes and label: ``[B, ...], [B] -> [B, 32]`` uint8."""
    rows = []
    for image, label in zip(pixels.detach().cpu().contiguous(), labels.cpu()):
        digest = hashlib.sha256(image.numpy().tobytes())
        digest.update(str(int(label)).encode())
        rows.append(torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8))
    return torch.stack(rows)


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


def _allocate(
    rows: int, shape: tuple[int, ...], dtype, memory_limit_gb: float, spill_dir: Path | None, name: str
) -> np.ndarray:
    size = rows * math.prod(shape) * np.dtype(dtype).itemsize
    if size <= memory_limit_gb * 2**30 or spill_dir is None:
        return np.empty((rows, *shape), dtype=dtype)
    spill_dir.mkdir(parents=True, exist_ok=True)
    path = spill_dir / f"{name}-{os.getpid()}.npy"
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, *shape))
