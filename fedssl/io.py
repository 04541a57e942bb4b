"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer goes through :func:`_atomic_file`: the data is written to a
temporary file in the target's own folder (so ``os.replace`` is a rename on one
file system), flushed and fsynced, then renamed over the target. If writing or
serialising fails, the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_savefig", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save"]


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` atomically when the block succeeds.

    Creates missing parent folders. On any exception the temporary file is
    deleted, the target keeps its old content, and the exception propagates.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it (best effort)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with _atomic_file(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (encoded before anything is written)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` atomically: a failed pickle leaves the old file in place."""
    with _atomic_file(path) as handle:
        torch.save(obj, handle)


def atomic_savefig(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it; returns the path."""
    import matplotlib.pyplot as plt

    with _atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)
