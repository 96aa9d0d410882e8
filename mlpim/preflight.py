"""`preflight(cfg, overrides)`: what can be checked from the config and the file system, checked
before the model loads. Each failure is an `MlpimError` naming the value and what is allowed.

An experiment config declares `sites:` (the site kinds it can patch; empty = any) and `ignores:`
(top-level keys it never reads, e.g. `site` for `ioi_alignment`); a command-line override of an
ignored key is refused rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig

from mlpim.errors import MlpimError

# First bytes of the direction files mlpim reads: torch.save (zip or legacy pickle), numpy .npy
MAGIC = {b"PK\x03\x04": "torch zip", b"\x80": "pickle", b"\x93NUMPY": "npy"}


def override_key(override: str) -> str:
    """`++extra.n_random=5` -> `extra.n_random`; `site=resid_post` -> `site`."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def ignored_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The overrides whose key (or its top-level key) the experiment declares it ignores."""
    ignores = list(cfg.get("ignores") or [])
    out = []
    for o in overrides:
        key = override_key(o)
        top = key.split(".", 1)[0].split("/", 1)[0]
        if any(top == i or top.startswith(f"{i}_") for i in ignores):
            out.append(o)
    return out


def check_direction_file(key: str, path: str | None) -> None:
    """A direction file exists and starts like a torch or numpy file."""
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        raise MlpimError(f"{key}={path}: no such file (a saved subspace.pt or a .pt/.npy tensor)")
    head = p.open("rb").read(8)
    if not any(head.startswith(m) for m in MAGIC):
        raise MlpimError(f"{key}={path}: not a torch (.pt) or numpy (.npy) file")


def model_sizes(cfg: DictConfig) -> dict:
    """The sizes the model config declares (`model.sizes`, or the tiny model's), else {}."""
    return dict(cfg.model.get("sizes") or cfg.model.get("tiny") or {})


def site_width(cfg: DictConfig) -> int | None:
    """The site's width when the model config gives it, else None."""
    return model_sizes(cfg).get("d_mlp" if cfg.site.kind == "mlp_post" else "d_model")


def check_extra_keys(cfg: DictConfig) -> None:
    """`++extra.typo=1` slips past the typed schema (`++` force-adds); refuse it here."""
    from mlpim.config import ExtraConfig

    known = {f.name for f in fields(ExtraConfig)}
    unknown = sorted(set(cfg.get("extra") or {}) - known)
    if unknown:
        raise MlpimError(f"unknown option extra.{unknown[0]}; known: {', '.join(sorted(known))}")


DTYPES = ("float32", "bfloat16", "float16", "float64")  # what `model.dtype` may name


def check_dtype(cfg: DictConfig) -> None:
    """`model.dtype` names a floating-point torch dtype."""
    dtype = cfg.model.get("dtype", "float32")
    if dtype not in DTYPES:
        raise MlpimError(f"model.dtype={dtype}: allowed: {', '.join(DTYPES)}")


def check_site_and_dim(cfg: DictConfig) -> None:
    """The site kind the experiment can use, the layer and `method.dim` where the model tells."""
    ignores = set(cfg.get("ignores") or [])
    allowed = list(cfg.get("sites") or [])
    n_layers = model_sizes(cfg).get("n_layers")
    layer = cfg.site.get("layer")
    if "site" not in ignores and n_layers and layer is not None and not 0 <= layer < n_layers:
        raise MlpimError(
            f"site.layer={layer}: layer {layer} is outside the model: {cfg.model.name} has "
            f"layers 0..{n_layers - 1}"
        )
    if "site" not in ignores and allowed and cfg.site.kind not in allowed:
        raise MlpimError(
            f"site={cfg.site.kind}: {cfg.experiment} works at {', '.join(allowed)} only"
        )
    if "method" in ignores or cfg.method.name not in ("das", "mean_diff"):
        return
    if cfg.method.dim < 1:
        raise MlpimError(f"method.dim={cfg.method.dim}: the subspace needs at least 1 dimension")
    width = site_width(cfg)
    if width and "site" not in ignores and cfg.method.dim > width:
        raise MlpimError(
            f"method.dim={cfg.method.dim} exceeds the width {width} of {cfg.site.kind} on "
            f"{cfg.model.name}; allowed: 1..{width}"
        )


def preflight(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Check `cfg` (and the command line's `overrides`) before any model is loaded."""
    ignored = ignored_overrides(cfg, overrides or [])
    if ignored:
        raise MlpimError(
            f"{cfg.experiment} ignores {', '.join(ignored)} (it does not read "
            f"{', '.join(cfg.ignores)}); drop the override or pick another experiment"
        )
    check_extra_keys(cfg)
    check_dtype(cfg)
    check_direction_file("direction", cfg.get("direction"))
    extra = cfg.get("extra") or {}
    check_direction_file("extra.resid_direction", extra.get("resid_direction"))
    check_site_and_dim(cfg)
