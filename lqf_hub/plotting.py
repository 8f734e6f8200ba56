"""The one way lqf-hub draws: figures on matplotlib's file backend (no display needed), written as PNGs
atomically (a reader never sees half a file)."""

import io
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``matplotlib.pyplot.subplots`` on the Agg backend: ``(figure, axes)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_png(fig: Any, path: str | Path) -> None:
    """Lay out ``fig``, write it to ``path`` as a 100-dpi PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
