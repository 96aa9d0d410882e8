"""A direction (or k-dim subspace) to check: read once, accepted in one place.

`load_direction(path, options, ...)` reads a direction in every format mlpim reads (its own
subspace.pt, .pt/.npy/.npz/safetensors tensor files, causalab rotations, pyvene and SAELens
folders: `mlpim.engine.readers`). It tells the format from the content once
(`readers.file_kind`), reads the file once, and refuses in one line what no check should see:
a file that is not what its name says or that would run code, a tensor that is no direction
(non-finite, zero, rank-deficient), a basis a tool saved as a rotation that is not orthonormal
(any other is orthonormalised: `readers.record.orthonormal_basis`, the one policy), a site or
layer other than the one given, a z direction, a layer or width the model's declared sizes rule
out, a subspace larger than the check takes. `Direction.fitted(model)` checks it against the loaded
model: the weights it was found on, site, layer, width, MLP type, norms, processing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.engine import readers
from mlpim.engine.models import fingerprint, site_width
from mlpim.engine.readers.record import Z_REFUSAL
from mlpim.errors import ConfigError, MlpimError

log = logging.getLogger(__name__)

NAMED = {".npy": "npy", ".pt": "torch", ".pth": "torch"}  # suffix -> the kind it promises
READABLE = (
    "mlpim reads a saved subspace.pt, a .pt/.npy/.npz/safetensors tensor file, a causalab "
    "rotation.safetensors, or a pyvene or SAELens folder (docs/bring-your-own.md)"
)
OPTION_NAMES = ("key", "feature", "columns", "rows")  # how to read a file: direction_<name>=


@dataclass(frozen=True)
class Direction(readers.ForeignDirection):
    """A direction (or k-dim subspace, `basis` d×k orthonormal) accepted for a run: what its
    reader found (`describe()` says it in one line), and the model it was found on when the
    file says it (mlpim's own subspace.pt records the model's name and weights' fingerprint)."""

    model: str | None = None
    fingerprint: str | None = None
    fingerprint_bf16: str | None = None  # of the weights rounded to bfloat16 (`fingerprint`)

    def placed(self, site: str | None, layer: int | None) -> Direction:
        """This direction, at `site`/`layer` where the file does not say its own."""
        layer = self.layer if self.layer is not None else layer
        return replace(self, site=self.site or site, layer=layer)

    def given(self, site: str | None, layer: int | None) -> Direction:
        """`placed` at the site and layer given for it (direction_site=, direction_layer=); a
        file that says other ones is refused."""
        if site is not None and site not in readers.SITES:
            sites = ", ".join(readers.SITES)
            raise MlpimError(f"{self.path}: direction_site={site} is not a site; sites: {sites}")
        for name, found, want in (("site", self.site, site), ("layer", self.layer, layer)):
            if found is not None and want is not None and found != want:
                raise MlpimError(
                    f"{self.path} says {name} {found!r} ({self.describe()}), but direction_"
                    f"{name}={want}; drop direction_{name}="
                )
        return self.placed(site, layer)

    def check_declared(
        self, sizes: dict, model_name: str, max_k: int | None, experiment: str
    ) -> None:
        """The checks of `readers.check_fits` that need no model: a z direction, a layer or
        width the model's declared `sizes` rule out; for a check of at most `max_k` dimensions
        (None: no check), a direction without its site and layer, or a larger subspace."""
        what = f"{self.path} ({self.describe()})"
        if self.site == "z":
            raise MlpimError(f"{self.path}: {Z_REFUSAL}")
        if max_k is not None and (self.site is None or self.layer is None):
            raise MlpimError(
                f"{what} does not say the site and layer it was found at; "
                "give them: direction_site=KIND direction_layer=N"
            )
        n_layers = sizes.get("n_layers")
        width = sizes.get("d_mlp" if self.site == "mlp_post" else "d_model")
        if self.layer is not None and n_layers and not 0 <= self.layer < n_layers:
            raise MlpimError(
                f"{what}: layer {self.layer} is outside {model_name} (layers 0..{n_layers - 1})"
            )
        if self.site is not None and width and self.width != width:
            raise MlpimError(
                f"{what}: width {self.width}, but {self.site} of {model_name} is {width}"
            )
        if max_k is not None and self.k > max_k:
            raise MlpimError(
                f"{self.path} holds a {self.k}-D subspace ({self.describe()}); {experiment} checks "
                f"at most {max_k} dimensions whole: choose columns with direction_columns=[...] "
                f"(0..{self.k - 1}), or check each in a sweep: "
                f"mlpim check -m {self.path} direction_columns=range({self.k})"
            )

    def fitted(
        self, model, site: str | None = None, layer: int | None = None
    ) -> Float[Tensor, "d k"]:
        """The basis, checked against the loaded `model` (the weights it was found on, then
        `readers.check_fits`, said in one INFO line) and, given `site`/`layer` (taken where the
        file does not say them), against that place."""
        placed = self.placed(site, layer)
        placed.check_weights(model)
        placed.check_fits(model)
        if site is not None and (
            (placed.site, placed.layer) != (site, layer) or placed.width != site_width(model, site)
        ):
            raise ConfigError(
                f"{self.path} holds a subspace of {placed.site} layer {placed.layer} (width "
                f"{placed.width}), not {site} layer {layer} (width {site_width(model, site)})"
            )
        return placed.basis

    def check_weights(self, model) -> None:
        """A clear error when this direction was found on other weights than `model`'s: the
        same weights, or the same rounded to bfloat16 (one found in float32, checked on the
        model loaded in bfloat16, or the other way round)."""
        if self.fingerprint is None or self.fingerprint == fingerprint(model):
            return
        if self.fingerprint_bf16 != fingerprint(model, torch.bfloat16):
            raise ConfigError(
                f"{self.path} was found on model {self.model!r} (weights {self.fingerprint}), "
                f"not on {model.cfg.model_name!r} (weights {fingerprint(model)})"
            )

    def check_fits(self, model) -> None:
        """Log what this direction is (one INFO line); refuse, in one line, one that does not
        fit `model` (site, layer, width, MLP type, norms, processing: `readers.check_fits`)."""
        note = f" ({self.note})" if self.note else ""
        log.info("direction %s: %s%s", self.path, self.describe(), note)
        compat = bool(getattr(model, "compatibility_mode", False))
        try:
            readers.check_fits(self, readers.sizes_of(model), compat=compat)
        except MlpimError as e:
            raise ConfigError(str(e)) from None


def load_direction(
    path: str | Path,
    options: dict | None = None,
    site: str | None = None,
    layer: int | None = None,
    *,
    max_k: int | None = None,
    sizes: dict | None = None,
    model_name: str = "the model",
    experiment: str = "this experiment",
) -> Direction:
    """The direction at `path`, read once (`options`: OPTION_NAMES, the config's direction_key=,
    direction_columns=, ...) and checked as far as no model is needed: at the `site`/`layer`
    given for it, within the model's declared `sizes` ({} or None: unknown), and of at most
    `max_k` dimensions where the caller checks it (None: not checked). Every refusal is one
    line."""
    path = Path(path)
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if not path.exists():
        link = f" (a symbolic link to {path.readlink()})" if path.is_symlink() else ""
        raise ConfigError(f"{path}: no such file or folder{link}; {READABLE}")
    if not path.is_file() and not path.is_dir():
        raise ConfigError(f"{path}: not a file or folder (a device, pipe or socket); {READABLE}")
    try:
        fmt, loaded = _content(path)
        rec = readers.read_direction(path, fmt, loaded, **given)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    saved = loaded if fmt == "mlpim" else {}
    read = {f.name: getattr(rec, f.name) for f in fields(rec)}
    marks = {k: saved.get(k) for k in ("model", "fingerprint", "fingerprint_bf16")}
    found = Direction(**read, **marks)
    direction = found.given(site, layer)
    direction.check_declared(sizes or {}, model_name, max_k, experiment)
    return direction


def _content(path: Path) -> tuple[str, object]:
    """The format of `path` (`readers.FORMATS`, sniffed once) and, for a .npy or torch file, what
    it holds (read once); a file that is not what its name says is refused, naming what it is."""
    if path.is_dir():
        return readers.sniff(path), None
    kind = readers.file_kind(path)
    if kind in ("npz", "safetensors", "causalab"):
        return kind, None
    if kind in readers.CORRUPT:
        raise ConfigError(f"{path}: {readers.KINDS[kind]}; save or copy it again")
    if kind not in ("npy", "torch", "pickle"):
        raise ConfigError(
            f"{path}: {readers.KINDS[kind]}, not a torch (.pt) or numpy (.npy) file; {READABLE}"
        )
    promised, readable = NAMED.get(path.suffix.lower()), "npy" if kind == "npy" else "torch"
    if promised is not None and promised != readable:
        right = ".npy" if readable == "npy" else ".pt"
        raise ConfigError(
            f"{path}: {readers.KINDS[kind]} named {path.suffix}; rename it to {path.stem}{right}"
        )
    if kind == "npy":
        return "npy", readers.load_npy(path)
    loaded = readers.load_torch(path, kind)
    return ("mlpim" if isinstance(loaded, dict) and "basis" in loaded else "torch"), loaded
