"""Atomic file and directory writes with the usual permissions.

Everything lqf-hub writes appears complete or not at all: content goes to a temporary name in the same
directory and is renamed into place. Temporary files and directories are created private (0600 / 0700);
the final ones get the modes any program would give them under the current umask (0644 / 0755 with the
usual umask 022), so other users, containers and web servers can read a saved model.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes of freshly created files and directories."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``target`` in one rename (an existing ``target``
    is kept until then), on error it is removed and ``target`` stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        _publish_modes(staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, with the umask's file mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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


def save_keyed_tensors(path: str | os.PathLike, tensors: dict, key: str, **metadata: str) -> None:
    """Tensors written atomically as safetensors with ``key`` (a digest of what they were computed from) in
    their metadata: a cache that ``load_keyed_tensors`` reads back only for the same key."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({name: t.contiguous() for name, t in tensors.items()},
                                  metadata={**metadata, "key": key}))


def load_keyed_tensors(path: str | os.PathLike, key: str, names: tuple[str, ...]) -> tuple[dict, dict] | None:
    """``(tensors, metadata)`` saved at ``path`` by ``save_keyed_tensors`` with ``key``; None if absent,
    stale (another key), cut or unreadable — a cache to recompute, never an error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as saved:
            metadata = saved.metadata() or {}
            if metadata.get("key") != key:
                return None
            return {name: saved.get_tensor(name) for name in names}, metadata
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
