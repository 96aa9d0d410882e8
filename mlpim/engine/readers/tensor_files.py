"""Read a direction from a plain tensor file: causalab, safetensors, .npy, .npz, torch, mlpim.

- causalab (the Hydra-based successor of the CausalAbstraction code) saves a PCA subspace as
  `rotation.safetensors` with `rotation_matrix` (d_model, k), orthonormal columns, and
  `explained_variance_ratio` (k) (causalab/analyses/subspace/pca.py `find_pca_subspace`). The
  file says nothing about site or layer: the caller gives them. Its activations are the HF
  model's own (raw) ones.
- Any safetensors / .npz file: the tensor named by `key` (needed when there are several).
- .npy: the one array. torch files: a tensor, or a dict of tensors with `key`.
- mlpim's own `subspace.pt`: a dict with `basis` (d×k) and its `site`, `layer` and metadata.

A 1-D tensor is one direction; a 2-D tensor is read as d×k (vectors in columns): `columns`
picks some, and `rows` reads vectors stored in rows instead (as SAE decoders do). Nothing is
unpickled: torch files load with `weights_only=True`, numpy with `allow_pickle=False`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mlpim.engine.readers.record import (
    ForeignDirection,
    agree,
    checked_orthonormal,
    one_line,
    pick,
    span_basis,
)
from mlpim.errors import MlpimError

CAUSALAB_KEY = "rotation_matrix"
PYVENE_KEY = "rotate_layer.parametrizations.weight.original"


def _pick_key(keys: list[str], key: str | None, what: str) -> str:
    """`key`, or the only key; a one-line refusal listing the keys otherwise."""
    if key is None and len(keys) == 1:
        return keys[0]
    if key is None:
        raise MlpimError(f"{what} holds {len(keys)} tensors; choose one with key=: {keys}")
    if key not in keys:
        raise MlpimError(f"{what}: no tensor {key!r}; it holds {keys}")
    return key


def safetensors_tensor(path: Path, key: str | None) -> tuple[str, Tensor]:
    """(key, tensor) of a safetensors file, reading only that tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            name = _pick_key(sorted(f.keys()), key, str(path))
            return name, f.get_tensor(name)
    except SafetensorError as e:
        raise MlpimError(f"{path} is not a readable safetensors file: {one_line(e)}") from e


def numpy_tensor(path: Path, key: str | None) -> tuple[str | None, Tensor]:
    """(key, tensor) of a .npy (key None) or .npz file, loaded with allow_pickle=False."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            if key is not None:
                raise MlpimError(f"{path} is one .npy array; key={key!r} does not apply")
            return None, torch.from_numpy(np.array(loaded))
        with loaded:
            name = _pick_key(sorted(loaded.files), key, str(path))
            return name, torch.from_numpy(np.array(loaded[name]))
    except (ValueError, OSError, EOFError) as e:
        raise MlpimError(f"{path} is not a numpy file mlpim can read safely: {one_line(e)}") from e


def torch_object(path: Path):
    """What a torch file holds, loaded without running code from it (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MlpimError(f"{path} is not a file mlpim can read safely: {one_line(e)}") from e


def torch_tensor(path: Path, loaded, key: str | None) -> tuple[str | None, Tensor]:
    """(key, tensor) of a loaded torch file: the tensor itself, or a dict entry."""
    if torch.is_tensor(loaded):
        if key is not None:
            raise MlpimError(f"{path} holds one tensor; key={key!r} does not apply")
        return None, loaded
    if not isinstance(loaded, dict):
        raise MlpimError(f"{path} holds a {type(loaded).__name__}, not a tensor or a dict")
    if PYVENE_KEY in loaded:
        raise MlpimError(f"{path} is one pyvene intervention; give its folder (with config.json)")
    tensors = sorted(k for k, v in loaded.items() if torch.is_tensor(v))
    if not tensors:
        raise MlpimError(f"{path} holds a dict without tensors (keys {sorted(map(str, loaded))})")
    name = _pick_key(tensors, key, str(path))
    return name, loaded[name]


def as_matrix(t: Tensor, columns, rows, what: str) -> Tensor:
    """A d×k matrix from a vector or a matrix: `columns` picks columns, `rows` reads rows."""
    if columns is not None and rows is not None:
        raise MlpimError(f"{what}: give columns= or rows=, not both")
    if t.dim() == 1:
        if columns is not None or rows is not None:
            raise MlpimError(f"{what} is one vector; columns=/rows= do not apply")
        return t[:, None]
    if t.dim() != 2:
        raise MlpimError(f"{what} has shape {tuple(t.shape)}; expected a vector or a matrix")
    if rows is not None:
        return t[pick(rows, t.shape[0], f"{what}: rows")].T
    if columns is not None:
        return t[:, pick(columns, t.shape[1], f"{what}: columns")]
    if t.shape[1] > t.shape[0]:
        shape = tuple(t.shape)
        raise MlpimError(f"{what}: {shape} has more columns than rows; vectors in rows need rows=")
    return t


def read_mlpim(path: Path, saved: dict, site, layer) -> ForeignDirection:
    """mlpim's own saved subspace (`save_subspace`): basis, site and layer from the file."""
    basis = saved["basis"]
    if not torch.is_tensor(basis) or basis.dim() != 2:
        raise MlpimError(f"{path}: 'basis' is not a d×k tensor")
    what = str(path)
    keep = ("model", "k", "seed", "position")
    note = ", ".join(f"{k}={saved[k]}" for k in keep if k in saved)
    return ForeignDirection(
        basis=checked_orthonormal(basis, f"{what}: basis"),
        site=agree(saved.get("site"), site, "site", what),
        layer=agree(saved.get("layer"), layer, "layer", what),
        fmt="mlpim",
        kind="subspace",
        note=note,
        path=what,
    )


def read_tensor_file(
    path: str | Path,
    fmt: str,
    key: str | None = None,
    columns=None,
    rows=None,
    site: str | None = None,
    layer: int | None = None,
) -> ForeignDirection:
    """A direction from a causalab / safetensors / npy / npz / torch / mlpim file (`fmt`)."""
    path = Path(path)
    if fmt in ("safetensors", "causalab"):
        default = CAUSALAB_KEY if fmt == "causalab" else None
        name, t = safetensors_tensor(path, key if key is not None else default)
    elif fmt in ("npy", "npz"):
        name, t = numpy_tensor(path, key)
    else:
        loaded = torch_object(path)
        if isinstance(loaded, dict) and "basis" in loaded:
            return read_mlpim(path, loaded, site, layer)
        name, t = torch_tensor(path, loaded, key)
    what = f"{path}" + (f" [{name}]" if name else "")
    matrix = as_matrix(t, columns, rows, what)
    orthonormal = fmt == "causalab" and name == CAUSALAB_KEY
    basis = checked_orthonormal(matrix, what) if orthonormal else span_basis(matrix, what)
    picked = f" columns {list(columns)}" if columns is not None else ""
    picked += f" rows {list(rows)}" if rows is not None else ""
    shape = f"{tuple(t.shape)} {t.dtype}"
    note = f"causalab PCA rotation {shape}" if orthonormal else f"{shape}, orthonormalised"
    return ForeignDirection(
        basis=basis.contiguous(),
        site=site,
        layer=layer,
        fmt=fmt,
        kind=f"tensor {name!r}" if name else "tensor",
        origin=None,
        note=note + picked,
        path=str(path),
        requires=frozenset({"raw_activations"}) if fmt == "causalab" else frozenset(),
    )
