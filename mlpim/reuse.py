"""Work shared between the steps of one process, by content hash (`make paper`, one `mlpim run`).

Inside `session()`, a loaded model, prepared pairs, DAS results and natural activations are kept
and handed to any later step that asks for the same thing: the key of each is a hash of
everything its value depends on (the model's weights in full, the pair tokens, the site, the
engine, the settings, the seed), so a hit returns what the computation would return. A replayed
computation that draws from torch's global RNG leaves that RNG as the computation left it.
Outside a session, or with the environment variable MLPIM_REUSE=0, nothing is kept.

Inside `persist(directory, kinds)` (`mlpim check`'s `extra.activation_cache`), those kinds are
also kept on disk, so that a later process finds them: each file is named by a hash of the key,
mlpim's source code and the torch and transformers versions, so any change of code or library
misses. A value read back is handed to the caller's `verify` (the prepared pairs: their first
rows prepared again must agree), and recomputed when it disagrees or cannot be read.
`tests/test_reuse.py` checks that a `make paper` with reuse writes byte-identical tables.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from mlpim.files import atomic_write

log = logging.getLogger(__name__)

T = TypeVar("T")
LIMITS = {"model": 1, "prepare": 8, "augmented": 2, "das": 64, "random_das": 64, "natural": 4}


class _Session:
    """The values kept by kind (each a small LRU), the models' weight hashes, hit counts."""

    def __init__(self) -> None:
        self.values: dict[str, OrderedDict] = {}
        self.weights: dict[int, tuple[Any, tuple, str]] = {}  # id -> (model, versions, hash)
        self.hits: dict[str, int] = {}


_current: _Session | None = None
_disk: tuple[Path, frozenset[str]] | None = None  # (directory, kinds) inside `persist`
_MISSING = object()


def enabled() -> bool:
    """Whether a session is open (and MLPIM_REUSE is not 0)."""
    return _current is not None


@contextmanager
def session() -> Iterator[None]:
    """Keep shared work until the block ends (a nested session shares the outer one)."""
    global _current
    if _current is not None or os.environ.get("MLPIM_REUSE", "1") == "0":
        yield
        return
    _current = _Session()
    try:
        yield
    finally:
        _current = None


def hits() -> dict[str, int]:
    """How many times each kind of work was reused in the open session."""
    return dict(_current.hits) if _current else {}


def memo(
    kind: str,
    key: tuple | Callable[[], tuple],
    compute: Callable[[], T],
    valid: Callable[[T], bool] | None = None,
    verify: Callable[[T], bool] | None = None,
) -> T:
    """`compute()`, or the value kept under (kind, key) in the open session (if `valid` says so)
    or on disk inside `persist` (if `verify` says so). A callable `key` is only computed where a
    value may be kept (hashing weights costs time)."""
    folder = _folder(kind)
    if _current is None and folder is None:
        return compute()
    key = key() if callable(key) else key
    store = _current.values.setdefault(kind, OrderedDict()) if _current else OrderedDict()
    if key in store and (valid is None or valid(store[key])):
        store.move_to_end(key)
        _current.hits[kind] = _current.hits.get(kind, 0) + 1
        return store[key]
    value = _read(folder, kind, key, verify) if folder else _MISSING
    if value is _MISSING:
        value = compute()
        if folder:
            _write(folder, kind, key, value)
    store[key] = value
    while len(store) > LIMITS.get(kind, 8):
        store.popitem(last=False)
    return value


@contextmanager
def persist(directory: str | Path | None, kinds: Iterable[str]) -> Iterator[None]:
    """Inside the block, keep `kinds` of work on disk under `directory` too (None: nothing)."""
    global _disk
    before = _disk
    _disk = (Path(directory), frozenset(kinds)) if directory else before
    try:
        yield
    finally:
        _disk = before


def _folder(kind: str) -> Path | None:
    """Where `kind` is kept on disk now, or None."""
    if _disk is None or kind not in _disk[1]:
        return None
    return _disk[0] / kind


@functools.cache
def code_version() -> str:
    """A hash of mlpim's source files and the torch and transformers versions."""
    import transformers

    root = Path(__file__).parent
    files = sorted(root.rglob("*.py"))
    parts = [(str(f.relative_to(root)), f.read_bytes()) for f in files]
    return digest(parts, torch.__version__, transformers.__version__)


def _path(folder: Path, key: tuple) -> Path:
    return folder / f"{digest(code_version(), key)[:32]}.pt"


def _read(folder: Path, kind: str, key: tuple, verify: Callable[[Any], bool] | None) -> Any:
    """The value kept on disk, if it loads and `verify` accepts it; else `_MISSING`."""
    path = _path(folder, key)
    if not path.exists():
        return _MISSING
    try:
        value = torch.load(path, weights_only=False)
    except Exception as e:  # a truncated or foreign file: recompute, as if missing
        log.warning("cache %s unreadable (%s); recomputing", path, e)
        return _MISSING
    if verify is not None and not verify(value):
        log.warning("cache %s differs from what this model computes; recomputing", path)
        return _MISSING
    log.info("%s read from the cache %s", kind, path)
    return value


def _write(folder: Path, kind: str, key: tuple, value: Any) -> None:
    """Keep `value` on disk; a failed write leaves the run as it is, with one warning."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(_path(folder, key), lambda p: torch.save(value, p))
    except Exception as e:
        log.warning("could not keep %s in the cache %s (%s); going on without", kind, folder, e)


def replay(
    kind: str,
    key: tuple | Callable[[], tuple],
    compute: Callable[[], T],
    valid: Callable[[T], bool] | None = None,
) -> T:
    """Like `memo` for a computation that draws from torch's global RNG: a hit returns a deep
    copy of the kept value and sets the RNG to the state the computation left it in."""
    if _current is None:
        return compute()

    def run() -> tuple[T, Tensor]:
        value = compute()
        return value, torch.get_rng_state()

    value, state = memo(kind, key, run, valid and (lambda kept: valid(kept[0])))
    torch.set_rng_state(state)
    return copy.deepcopy(value)


def digest(*parts: Any) -> str:
    """A sha256 of tensors (dtype, shape, bytes), dataclasses (field by field) and plain values."""
    h = hashlib.sha256()
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


def _feed(h, x: Any) -> None:
    if isinstance(x, np.ndarray) and x.dtype != object:
        x = torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        t = x.detach().contiguous().cpu()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        h.update(type(x).__name__.encode())
        for f in dataclasses.fields(x):
            _feed(h, getattr(x, f.name))
    elif isinstance(x, list | tuple):
        h.update(f"[{len(x)}".encode())
        for item in x:
            _feed(h, item)
    elif isinstance(x, dict):
        h.update(f"{{{len(x)}".encode())
        for k in sorted(x, key=repr):
            h.update(repr(k).encode())
            _feed(h, x[k])
    else:
        h.update(repr(x).encode())


def model_key(model) -> tuple[str, ...]:
    """The model's part of a key: its weights' hash, and the devices its inputs and parameters
    are on (a value read from disk must land where the model is)."""
    devices = sorted({str(p.device) for p in model.parameters()})
    return (weights_hash(model), str(model.cfg.device), *devices)


def weights_hash(model) -> str:
    """A sha256 of every parameter and buffer of `model`, in full; recomputed only when one of
    them has changed in place since (torch's version counters)."""
    tensors = [*model.parameters(), *model.buffers()]
    versions = tuple(t._version for t in tensors)
    kept = _current.weights.get(id(model)) if _current else None
    if kept is not None and kept[1] == versions:
        return kept[2]
    value = digest(*(t.data for t in tensors))
    if _current is not None:
        _current.weights[id(model)] = (model, versions, value)  # keeps `model`: ids stay unique
    return value
