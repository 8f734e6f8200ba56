"""Weight files: the sha256 that records where weights came from, and a safetensors reader that checks
names and shapes against what the model expects before a single tensor is loaded."""

import hashlib
import os
from collections.abc import Mapping, Sequence

import safetensors
from safetensors.torch import load_file
from torch import Tensor

from ..errors import CheckpointError


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors(path: str | os.PathLike, expected: Mapping[str, Sequence[int]], against: str) -> dict[str, Tensor]:
    """The tensors in ``path`` once its header matches ``expected`` (name -> shape); ``against`` names what
    the file should fit, for the error."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({err}).") from None
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(n for n in set(expected) & set(shapes) if tuple(expected[n]) != shapes[n])
    problems = [f"missing {missing[:5]}"] if missing else []
    problems += [f"unexpected {unexpected[:5]}"] if unexpected else []
    problems += [f"{n} has shape {list(shapes[n])}, expected {list(expected[n])}" for n in wrong[:5]]
    if problems:
        raise CheckpointError(f"{path} does not match {against}: " + "; ".join(problems) + ".")
    try:
        return load_file(str(path))
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err}).") from None
