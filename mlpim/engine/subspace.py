"""Subspaces: a trainable orthonormal basis (DAS rotation), saving and loading.

`load_subspace` reads a direction in every format mlpim reads: its own subspace.pt and plain
.pt/.npy tensors (checked here: the content must be what the name says, nothing is unpickled),
and, through `mlpim.engine.readers`, .npz/safetensors files, causalab rotations and pyvene and
SAELens folders. Every format passes the same checks of a meaningful direction
(`basis_problem`: finite, non-zero, full rank).
"""

from __future__ import annotations

import zipfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from mlpim.engine import readers
from mlpim.engine.patching import subspace_patch
from mlpim.engine.readers.record import basis_problem, pick
from mlpim.errors import ConfigError, MlpimError
from mlpim.files import save_torch


class RotatedSubspace(nn.Module):
    """A d×k basis with orthonormal columns, kept orthonormal by torch's parametrization."""

    def __init__(self, d: int, k: int, generator: torch.Generator | None = None):
        super().__init__()
        if not 1 <= k <= d:
            raise ValueError(f"subspace dim {k} must be between 1 and the site width {d}")
        self.lin = orthogonal(nn.Linear(k, d, bias=False))
        with torch.no_grad():
            init = torch.linalg.qr(torch.randn(d, k, generator=generator))[0]
            self.lin.weight = init

    @property
    def basis(self) -> Float[Tensor, "d k"]:
        """The d×k orthonormal basis."""
        return self.lin.weight

    def forward(self, base: Float[Tensor, "b d"], source: Float[Tensor, "b d"]) -> Tensor:
        """The base activation with its component in the basis taken from the source."""
        return subspace_patch(base, source, self.basis)


def orthonormalize(v: Float[Tensor, "d k"]) -> Float[Tensor, "d k"]:
    """Orthonormal basis of the span of v's columns (a single vector is normalised)."""
    return torch.linalg.qr(v.reshape(v.shape[0], -1))[0]


def save_subspace(path: Path, basis: Tensor, **meta) -> None:
    """Save a basis with its metadata (model, fingerprint, site, layer, k, seed, metrics ...),
    atomically (a temporary name, then renamed: never a partial file)."""
    save_torch({"basis": basis.detach().cpu(), **meta}, path)


def direction_meta(model, spec, kind: str, layer: int, position: str = "end") -> dict:
    """What ties a direction to where it was found: model, weights, processing, site, version."""
    from mlpim import __version__
    from mlpim.engine.models import fingerprint, processing, site_width

    return {
        "model": model.cfg.model_name,
        "fingerprint": fingerprint(model),
        "processing": processing(spec),
        "site": kind,
        "layer": layer,
        "position": position,
        "width": int(site_width(model, kind)),
        "mlpim_version": __version__,
    }


KINDS = {
    "npy": "a numpy .npy file",
    "npz": "a numpy .npz archive",
    "torch": "a torch file",
    "pickle": "a Python pickle",
    "zip": "a zip archive (not a torch file)",
    "gguf": "a GGUF model file",
    "text": "a text file",
    "empty": "an empty file",
    "binary": "a binary file of unknown format",
}
NAMED = {".npy": "npy", ".pt": "torch", ".pth": "torch"}  # suffix -> the kind it promises
READABLE = (
    "mlpim reads a saved subspace.pt, a .pt/.npy/.npz/safetensors tensor file, a causalab "
    "rotation.safetensors, or a pyvene or SAELens folder (docs/bring-your-own.md)"
)
OPTION_NAMES = ("key", "feature", "columns", "rows")  # how to read a file: direction_<name>=
_READ_OPTIONS: ContextVar[dict[str, dict] | None] = ContextVar("mlpim_read_options", default=None)


def file_kind(path: Path) -> str:
    """What a file is, from its content (a key of `KINDS`), whatever its name."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "zip"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
    if head[:1] == b"\x80":
        return "pickle"  # torch's legacy format, or any pickle
    if head.startswith(b"GGUF"):
        return "gguf"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    return "text"


def _npy(path: Path) -> Tensor:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "Object arrays" in str(e):
            raise ConfigError(
                f"{path}: a numpy file of Python objects (dtype=object), which only unpickling "
                "could read, and mlpim never unpickles: save a float array (np.save)"
            ) from None
        raise ConfigError(f"{path}: a numpy file numpy cannot read ({e})") from None
    if array.dtype.kind not in "fiu":
        raise ConfigError(f"{path}: a numpy array of dtype {array.dtype}, not real numbers")
    return torch.from_numpy(array).float()


def _torch(path: Path, kind: str) -> Tensor | dict:
    try:  # never runs code from the file
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ConfigError(
            f"{path}: {KINDS[kind]} that mlpim cannot load as tensors ({_torch_reason(e)}); it "
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


def _plain(path: Path, kind: str) -> Tensor | dict:
    """A .npy/.pt file's tensor or dict, read as what its content is (`kind`); a name that says
    otherwise is refused, naming what the file is."""
    promised, readable = NAMED.get(path.suffix.lower()), "npy" if kind == "npy" else "torch"
    if promised is not None and promised != readable:
        right = ".npy" if readable == "npy" else ".pt"
        raise ConfigError(
            f"{path}: {KINDS[kind]} named {path.suffix}; rename it to {path.stem}{right}"
        )
    return _npy(path) if kind == "npy" else _torch(path, kind)


def checked_basis(v: Tensor, path: Path) -> Tensor:
    """`v` when it is a meaningful direction or basis (see `basis_problem`), else a ConfigError."""
    problem = basis_problem(v)
    if problem is not None:
        raise ConfigError(f"{path}: no direction to check: {problem}")
    return v


@contextmanager
def reading_options(path: str | Path | None, options: dict):
    """Within the block, `load_subspace(path)` reads `path` with `options` (OPTION_NAMES: the
    config's direction_key=, direction_feature=, ...): how a run tells every loader of its
    `direction=` how to read it, down to the experiments that only pass the path."""
    given = {k: v for k, v in options.items() if v is not None}
    if not path or not given:
        yield
        return
    token = _READ_OPTIONS.set({**(_READ_OPTIONS.get() or {}), _where(path): given})
    try:
        yield
    finally:
        _READ_OPTIONS.reset(token)


def _where(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def load_subspace(
    path: str | Path, site: str | None = None, layer: int | None = None, **options
) -> dict:
    """A direction or subspace (`['basis']` d×k, orthonormal) in any format mlpim reads: its own
    subspace.pt, a tensor file, or another tool's file or folder (`mlpim.engine.readers`).

    `site`/`layer` are taken when the file does not say them. `options` (OPTION_NAMES; else
    those of `reading_options`) say how to read it. `['reader']` is the `ForeignDirection` that
    states what was found. Refused in one line: a file that is not what its name says, or that
    would run code; a tensor that is no direction (non-finite, zero, rank-deficient)."""
    path = Path(path)
    opts = {**(_READ_OPTIONS.get() or {}).get(_where(path), {}), **options}
    opts = {k: v for k, v in opts.items() if v is not None}
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder; {READABLE}")
    kind = None if path.is_dir() else file_kind(path)
    try:
        if kind in ("npy", "torch", "pickle"):
            loaded = _plain(path, kind)
            if isinstance(loaded, dict) and "basis" in loaded:
                return _mlpim_subspace(path, loaded, site, layer, opts)
        elif kind is not None and kind != "npz" and not _other_tool_file(path):
            raise ConfigError(
                f"{path}: {KINDS[kind]}, not a torch (.pt) or numpy (.npy) file; {READABLE}"
            )
        rec = readers.read_direction(path, **opts)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    rec = replace(rec, site=rec.site or site, layer=rec.layer if rec.layer is not None else layer)
    return {"basis": rec.basis, "site": rec.site, "layer": rec.layer, "reader": rec}


def _other_tool_file(path: Path) -> bool:
    """Whether a file that is neither .npy nor torch is one `readers.sniff` knows (safetensors)."""
    try:
        readers.sniff(path)
    except MlpimError:
        return False
    return True


def _mlpim_subspace(path: Path, saved: dict, site, layer, opts: dict) -> dict:
    """mlpim's own saved subspace, `direction_columns` picked, orthonormal."""
    if not torch.is_tensor(saved["basis"]):
        raise ConfigError(f"{path}: holds a 'basis' that is not a tensor")
    extra = sorted(set(opts) - {"columns"})
    if extra:
        named = ", ".join(f"direction_{o}" for o in extra)
        raise ConfigError(f"{path} is an mlpim subspace: {named} not for it (takes columns)")
    basis = checked_basis(saved["basis"].float(), path)
    basis = basis[:, None] if basis.dim() == 1 else basis
    note = ", ".join(f"{k}={saved[k]}" for k in ("model", "k", "seed") if k in saved)
    if "columns" in opts:
        chosen = pick(opts["columns"], basis.shape[1], f"{path}: direction_columns")
        basis, note = basis[:, chosen], f"{note}; columns {chosen}"
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    if not torch.allclose(basis.T @ basis, eye, atol=1e-4):
        basis = orthonormalize(basis)  # same span; the patch needs orthonormal columns
    kind, where = saved.get("site") or site, saved.get("layer")
    where = where if where is not None else layer
    rec = readers.ForeignDirection(
        basis=basis, site=kind, layer=where, fmt="mlpim", kind="subspace", note=note, path=str(path)
    )
    return {**saved, "basis": basis, "site": kind, "layer": where, "reader": rec}


def check_model(saved: dict, model, path: str | Path) -> None:
    """A clear error when a direction was found on other weights than `model`'s."""
    from mlpim.engine.models import fingerprint

    fp = saved.get("fingerprint")
    if fp is not None and fp != fingerprint(model):
        raise ConfigError(
            f"{path} was found on model {saved.get('model')!r} (weights {fp}), not on "
            f"{model.cfg.model_name!r} (weights {fingerprint(model)})"
        )
