"""Subspaces: a trainable orthonormal basis (DAS rotation), saving and loading."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from mlpim.engine.models import ConfigError
from mlpim.engine.patching import subspace_patch
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
        return self.lin.weight

    def forward(self, base: Float[Tensor, "b d"], source: Float[Tensor, "b d"]) -> Tensor:
        return subspace_patch(base, source, self.basis)


def orthonormalize(v: Float[Tensor, "d k"]) -> Float[Tensor, "d k"]:
    """Orthonormal basis of the span of v's columns (a single vector is normalised)."""
    return torch.linalg.qr(v.reshape(v.shape[0], -1))[0]


def save_subspace(path: Path, basis: Tensor, **meta) -> None:
    """Save a basis with its metadata (model, fingerprint, site, layer, k, seed, metrics ...),
    atomically (a temporary name, then renamed: never a partial file)."""
    save_torch({"basis": basis.detach().cpu(), **meta}, path)


def direction_meta(model, model_cfg, kind: str, layer: int, position: str = "end") -> dict:
    """What ties a direction to where it was found: model, weights, processing, site, version."""
    from mlpim import __version__
    from mlpim.engine.models import fingerprint, processing, site_width

    return {"model": model.cfg.model_name, "fingerprint": fingerprint(model),
            "processing": processing(model_cfg), "site": kind, "layer": layer,
            "position": position, "width": int(site_width(model, kind)),
            "mlpim_version": __version__}  # fmt: skip


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
MIN_NORM = 1e-6  # a direction (column) shorter than this points nowhere
RANK_TOL = 1e-4  # a k-D basis whose unit columns have a singular value below this is degenerate


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


def _plain(path: Path) -> Tensor | dict:
    """The file's tensor or dict, read as what its content is; a name that says otherwise is
    refused, naming what the file is."""
    kind, promised = file_kind(path), NAMED.get(path.suffix.lower())
    readable = {"npy": "npy", "torch": "torch", "pickle": "torch"}
    if kind not in readable:
        raise ConfigError(
            f"{path}: {KINDS[kind]}, not a torch (.pt) or numpy (.npy) file: save the direction "
            "with torch.save or numpy.save"
        )
    if promised is not None and promised != readable[kind]:
        right = ".npy" if readable[kind] == "npy" else ".pt"
        raise ConfigError(
            f"{path}: {KINDS[kind]} named {path.suffix}; rename it to {path.stem}{right}"
        )
    return _npy(path) if kind == "npy" else _torch(path, kind)


def basis_problem(v: Tensor) -> str | None:
    """Why `v` (a vector, or a d×k basis in its columns) is no direction; None when it is one:
    finite, no column of (near) zero norm, columns linearly independent."""
    if v.dim() not in (1, 2) or v.numel() == 0:
        return f"a tensor of shape {tuple(v.shape)}; a direction is a vector (d) or a basis (d×k)"
    bad = int((~torch.isfinite(v)).sum())
    if bad:
        return f"{bad} non-finite value(s) (NaN or inf) of {v.numel()}"
    m = v.double().reshape(v.shape[0], -1)
    norms = m.norm(dim=0)
    if (norms < MIN_NORM).any():
        i = int(norms.argmin())
        col = "" if m.shape[1] == 1 else f"column {i} has "
        return f"{col}norm {norms[i].item():.3g} (zero or below {MIN_NORM:g}): it points nowhere"
    s = torch.linalg.svdvals(m / norms)
    if m.shape[1] > 1 and s[-1] < RANK_TOL * s[0]:
        rank = int((s >= RANK_TOL * s[0]).sum())
        return (
            f"a rank-deficient basis: its {m.shape[1]} columns span only {rank} dimension(s) "
            f"(smallest singular value {s[-1].item():.2g} of unit columns)"
        )
    return None


def checked_basis(v: Tensor, path: Path) -> Tensor:
    """`v` when it is a meaningful direction or basis (see `basis_problem`), else a ConfigError."""
    problem = basis_problem(v)
    if problem is not None:
        raise ConfigError(f"{path}: no direction to check: {problem}")
    return v


def load_subspace(path: str | Path, site: str | None = None, layer: int | None = None) -> dict:
    """A saved subspace (`['basis']` is d×k), or a plain tensor file (.pt holding a tensor, or
    .npy; a vector is one direction) with its `site` and `layer` given by the caller. Refused in
    one line: a file that is not what its name says, a tensor that is no direction (non-finite,
    zero, rank-deficient)."""
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise ConfigError(f"{path}: {what} (a saved subspace.pt, or a .pt/.npy tensor)")
    try:
        saved = _plain(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if torch.is_tensor(saved):
        v = checked_basis(saved.float(), path)
        basis = orthonormalize(v[:, None] if v.dim() == 1 else v)
        return {"basis": basis, "site": site, "layer": layer}
    if not isinstance(saved, dict) or not torch.is_tensor(saved.get("basis")):
        raise ConfigError(f"{path}: holds neither a tensor nor a saved subspace (no 'basis')")
    basis = checked_basis(saved["basis"].float(), path)
    basis = basis[:, None] if basis.dim() == 1 else basis
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    if not torch.allclose(basis.T @ basis, eye, atol=1e-4):
        basis = orthonormalize(basis)  # same span; the patch needs orthonormal columns
    return {**saved, "basis": basis}


def check_model(saved: dict, model, path: str | Path) -> None:
    """A clear error when a direction was found on other weights than `model`'s."""
    from mlpim.engine.models import fingerprint

    fp = saved.get("fingerprint")
    if fp is not None and fp != fingerprint(model):
        raise ConfigError(
            f"{path} was found on model {saved.get('model')!r} (weights {fp}), not on "
            f"{model.cfg.model_name!r} (weights {fingerprint(model)})"
        )
