"""Read a direction from a plain tensor file: causalab, safetensors, .npy, .npz, torch, mlpim.

- causalab (the Hydra-based successor of the CausalAbstraction code) saves a PCA subspace as
  `rotation.safetensors` with `rotation_matrix` (d_model, k), orthonormal columns, and
  `explained_variance_ratio` (k) (causalab/analyses/subspace/pca.py `find_pca_subspace`). The
  file says nothing about site or layer: the caller gives them. Its activations are the HF
  model's own (raw) ones.
- Any safetensors / .npz file: the tensor named by `key` (needed when there are several).
- .npy: the one array. torch files: a tensor, or a dict of tensors with `key`.
- mlpim's own `subspace.pt`: a dict with `basis` (d×k) and its `site`, `layer` and metadata.

Every basis passes the one orthonormality policy of `record.orthonormal_basis`.

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
    one_line,
    orthonormal_basis,
    pick,
)
from mlpim.errors import ConfigError, MlpimError

CAUSALAB_KEY = "rotation_matrix"
PYVENE_KEY = "rotate_layer.parametrizations.weight.original"


def _pick_key(keys: list[str], key: str | None, what: str) -> str:
    """`key`, or the only key; a one-line refusal listing the keys otherwise."""
    if key is None and len(keys) == 1:
        return keys[0]
    if not keys:
        raise MlpimError(f"{what} holds no tensors")
    if key is None:
        raise MlpimError(
            f"{what} holds {len(keys)} tensors; choose one with direction_key=: {keys}"
        )
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
        raise MlpimError(f"{path}: a truncated or corrupt safetensors file ({one_line(e)})") from e


def numpy_tensor(path: Path, key: str | None) -> tuple[str | None, Tensor]:
    """(key, tensor) of an .npz file, loaded with allow_pickle=False."""
    try:
        with np.load(path, allow_pickle=False) as loaded:
            name = _pick_key(sorted(loaded.files), key, str(path))
            return name, torch.from_numpy(np.array(loaded[name]))
    except (ValueError, OSError, EOFError) as e:
        raise MlpimError(f"{path} is not a numpy file mlpim can read safely: {one_line(e)}") from e


def load_npy(path: Path) -> Tensor:
    """A .npy file's array as a tensor (its own dtype), loaded with allow_pickle=False; an array
    of Python objects or of no real numbers is refused in one line."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "Object arrays" in str(e):
            raise ConfigError(
                f"{path}: a numpy file of Python objects (dtype=object), which only unpickling "
                "could read, and mlpim never unpickles: save a float array (np.save)"
            ) from None
        raise ConfigError(f"{path}: a truncated or corrupt numpy .npy file ({e})") from None
    if array.dtype.kind not in "fiu":
        raise ConfigError(f"{path}: a numpy array of dtype {array.dtype}, not real numbers")
    return torch.from_numpy(array)


def load_torch(path: Path, kind: str):
    """What a torch file (`kind`: torch or pickle, `sniff.KINDS`) holds, loaded without running
    code from it (weights_only=True); a torch file torch cannot read is truncated or corrupt."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        if kind == "torch" and "Weights only load failed" not in str(e):
            reason = _torch_reason(e).split(". ")[0]
            raise ConfigError(f"{path}: a truncated or corrupt torch file ({reason})") from None
        what = "a torch file" if kind == "torch" else "a Python pickle"
        raise ConfigError(
            f"{path}: {what} that mlpim cannot load as tensors ({_torch_reason(e)}); it "
            "loads weights only and never runs code from a file: save the direction with "
            "torch.save(tensor) or numpy.save"
        ) from None


def _torch_reason(e: Exception) -> str:
    """The line of torch's (long) error that says what in the file was refused."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
        return text.splitlines()[0].split(". Please")[0][:120]
    return text.splitlines()[0][:120] if text else type(e).__name__


def torch_tensor(path: Path, loaded, key: str | None) -> tuple[str | None, Tensor]:
    """(key, tensor) of a loaded torch file: the tensor itself, or a dict entry."""
    if torch.is_tensor(loaded):
        if key is not None:
            raise MlpimError(f"{path} holds one tensor; direction_key={key!r} does not apply")
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
        raise MlpimError(f"{what}: give direction_columns= or direction_rows=, not both")
    if t.dim() == 1:
        if columns is not None or rows is not None:
            raise MlpimError(
                f"{what} is one vector; direction_columns=/direction_rows= do not apply"
            )
        return t[:, None]
    if t.dim() != 2:
        raise MlpimError(f"{what} has shape {tuple(t.shape)}; expected a vector or a matrix")
    if rows is not None:
        return t[pick(rows, t.shape[0], f"{what}: direction_rows")].T
    if columns is not None:
        return t[:, pick(columns, t.shape[1], f"{what}: direction_columns")]
    if t.shape[1] > t.shape[0]:
        shape = tuple(t.shape)
        raise MlpimError(
            f"{what}: {shape} has more columns than rows; vectors in rows need direction_rows="
        )
    return t


def _listed(items) -> list:
    """An index or a list of them, as a list (for the note)."""
    return [items] if isinstance(items, int) else list(items)


def _note(t: Tensor, rotation: bool, columns, rows) -> str:
    """What was read of tensor `t`: its shape and dtype, the columns or rows picked and, for a
    square matrix read without direction_rows=, that its orientation is a guess."""
    note = f"{tuple(t.shape)} {t.dtype}"
    note = f"causalab PCA rotation {note}" if rotation else note
    note += f" columns {_listed(columns)}" if columns is not None else ""
    note += f" rows {_listed(rows)}" if rows is not None else ""
    if t.dim() == 2 and t.shape[0] == t.shape[1] and rows is None:
        note += "; square, so its orientation is a guess: read as vectors in columns"
        note += " (direction_rows= reads vectors in rows)"
    return note


def read_mlpim(path: Path, saved: dict, site, layer, columns=None) -> ForeignDirection:
    """mlpim's own saved subspace (`save_subspace`): basis, site and layer from the file;
    `columns` picks some of its columns."""
    basis = saved["basis"]
    if not torch.is_tensor(basis):
        raise ConfigError(f"{path}: holds a 'basis' that is not a tensor")
    basis = basis[:, None] if basis.dim() == 1 else basis
    what = str(path)
    keep = ("model", "k", "seed", "position")
    note = ", ".join(f"{k}={saved[k]}" for k in keep if k in saved)
    if columns is not None:
        chosen = pick(columns, basis.shape[1], f"{what}: direction_columns")
        basis, note = basis[:, chosen], f"{note}; columns {chosen}"
    return ForeignDirection(
        basis=orthonormal_basis(basis, what),
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
    loaded=None,
    key: str | None = None,
    columns=None,
    rows=None,
    site: str | None = None,
    layer: int | None = None,
) -> ForeignDirection:
    """A direction from a causalab / safetensors / npy / npz / torch / mlpim file (`fmt`);
    `loaded`: the .npy or torch file's content when already read."""
    path = Path(path)
    if fmt in ("safetensors", "causalab"):
        default = CAUSALAB_KEY if fmt == "causalab" else None
        name, t = safetensors_tensor(path, key if key is not None else default)
    elif fmt == "npy":
        name, t = None, load_npy(path) if loaded is None else loaded
    elif fmt == "npz":
        name, t = numpy_tensor(path, key)
    else:
        loaded = load_torch(path, "torch") if loaded is None else loaded
        if isinstance(loaded, dict) and "basis" in loaded:
            if key is not None or rows is not None:
                raise MlpimError(f"{path} is an mlpim subspace: direction_key/rows do not apply")
            return read_mlpim(path, loaded, site, layer, columns)
        name, t = torch_tensor(path, loaded, key)
    what = f"{path}" + (f" [{name}]" if name else "")
    matrix = as_matrix(t, columns, rows, what)
    rotation = fmt == "causalab" and name == CAUSALAB_KEY
    basis = orthonormal_basis(matrix, what, rotation)
    return ForeignDirection(
        basis=basis.contiguous(),
        site=site,
        layer=layer,
        fmt=fmt,
        kind=f"tensor {name!r}" if name else "tensor",
        origin=None,
        note=_note(t, rotation, columns, rows),
        path=str(path),
        requires=frozenset({"raw_activations"}) if fmt == "causalab" else frozenset(),
    )
