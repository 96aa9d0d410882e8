"""Run directories in use are locked: one mlpim run (or sweep) at a time per directory.

The lock is an OS advisory lock (`flock`) on the directory itself: no lock file is written, and
the operating system releases it when the process ends, however it ends (exit, Ctrl-C, crash,
SIGKILL). A second run into a directory in use is refused in one line (`RunDirLocked`).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from mlpim.errors import MlpimError
from mlpim.files import write_error

try:
    import fcntl
except ImportError:  # not POSIX: directories are not locked
    fcntl = None

HELD: dict[Path, int] = {}  # directory -> file descriptor holding its lock, in this process
CREATED: set[Path] = set()  # directories this process created (a refusal removes them if empty)


class RunDirLocked(MlpimError):
    """Another run (another process, or this one) is using the directory right now."""


def make_dir(path: Path) -> bool:
    """Create `path` (and its parents); True when this process created it (now or earlier). A
    directory that cannot be created is a one-line `MlpimError`."""
    path = Path(path)
    if path.is_dir():
        return path.resolve() in CREATED
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise MlpimError(f"{path} exists and is not a directory") from None
        return False
    except OSError as e:
        mine = write_error(path, e)
        if mine is None:
            raise
        raise mine from e
    CREATED.add(path.resolve())
    return True


def remove_if_empty(path: Path) -> None:
    """Remove `path` when this process created it and it is still empty."""
    path = Path(path).resolve()
    if path in CREATED:
        with suppress(OSError):
            path.rmdir()  # fails, as it should, when anything is in it
        CREATED.discard(path)


def acquire(path: Path, what: str = "run") -> None:
    """Lock the existing directory `path` for this process, or raise `RunDirLocked`."""
    path = Path(path).resolve()
    if path in HELD:
        raise RunDirLocked(f"{path} is already in use by this process")
    if fcntl is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirLocked(
            f"{path} is in use by another mlpim {what} right now; refusing to run into it at the "
            "same time: choose another directory (hydra.run.dir=DIR, or hydra.sweep.dir=DIR with "
            "-m), or wait until that run ends"
        ) from None
    HELD[path] = fd


def release(path: Path) -> None:
    """Release this process's lock on `path` (nothing when it holds none)."""
    fd = HELD.pop(Path(path).resolve(), None)
    if fd is not None:
        with suppress(OSError):
            os.close(fd)  # closing the descriptor releases the flock


def release_all() -> None:
    """Release every lock this process holds."""
    for path in list(HELD):
        release(path)


def is_locked(path: Path) -> bool:
    """Whether another process (or descriptor) holds the lock of the directory `path`."""
    if fcntl is None or not Path(path).is_dir():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
