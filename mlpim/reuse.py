"""Work shared between the steps of one process, by content hash (`make paper`, one `mlpim run`).

Inside `session()`, a loaded model, prepared pairs, DAS results and natural activations are kept
and handed to any later step that asks for the same thing: the key of each is a hash of
everything its value depends on (the model's weights in full, the pair tokens, the site, the
engine, the settings, the seed), so a hit returns what the computation would return. A replayed
computation that draws from torch's global RNG leaves that RNG as the computation left it.
Outside a session, or with the environment variable MLPIM_REUSE=0, nothing is kept.
`tests/test_reuse.py` checks that a `make paper` with reuse writes byte-identical tables.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
LIMITS = {"model": 1, "prepare": 8, "augmented": 2, "das": 64, "random_das": 64, "natural": 4}


class _Session:
    """The values kept by kind (each a small LRU), the models' weight hashes, hit counts."""

    def __init__(self) -> None:
        self.values: dict[str, OrderedDict] = {}
        self.weights: dict[int, tuple[Any, tuple, str]] = {}  # id -> (model, versions, hash)
        self.hits: dict[str, int] = {}


_current: _Session | None = None


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
) -> T:
    """`compute()`, or the value kept under (kind, key) in the open session (if `valid` says so).
    A callable `key` is only computed inside a session (hashing weights costs time)."""
    if _current is None:
        return compute()
    key = key() if callable(key) else key
    store = _current.values.setdefault(kind, OrderedDict())
    if key in store and (valid is None or valid(store[key])):
        store.move_to_end(key)
        _current.hits[kind] = _current.hits.get(kind, 0) + 1
        return store[key]
    value = compute()
    store[key] = value
    while len(store) > LIMITS.get(kind, 8):
        store.popitem(last=False)
    return value


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
