"""Atomic writes for every artifact mlpim leaves on disk (any layer may use them).

A file appears complete or not at all: it is written to a hidden temporary name in the same
directory, flushed to disk, then renamed over the target. When the write fails, the temporary
file is removed; a full disk or a directory that cannot be written is a `MlpimError` (one line,
saying that nothing partial was left), any other failure keeps its traceback.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from mlpim.errors import MlpimError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(path: Path, err: OSError) -> MlpimError | None:
    """The one-line error for a write the user can fix (full disk, not writable); else None."""
    if err.errno in DISK_FULL:
        return MlpimError(
            f"disk full while writing {path}: nothing partial was left (files are written to a "
            f"temporary name, then renamed); free some space and run the same command again"
        )
    if err.errno in NOT_WRITABLE:
        return MlpimError(
            f"cannot write {path}: {err.strerror}; choose a directory you can write "
            "(hydra.run.dir=DIR, or hydra.sweep.dir=DIR with -m)"
        )
    return None


def _flush(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` a temporary file next to `path`, then rename it to `path`; returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        _flush(tmp)
        os.replace(tmp, path)
    except OSError as e:
        mine = write_error(path, e)
        if mine is None:
            raise
        raise mine from e
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    """`data` into `path`, atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def save_torch(obj: object, path: Path) -> Path:
    """`torch.save(obj)` into `path`, atomically (serialized in memory: a full disk surfaces as
    an OSError of the plain file write, not inside torch's zip writer)."""
    import torch  # slow import: `mlpim --help` imports this module (through mlpim.lock)

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())
