"""`preflight(cfg, overrides)`: what can be checked from the config and the file system, checked
before the model loads. Each failure is an `MlpimError` naming the value and what is allowed:
keys the schema does not know (also when added with `+`/`++`), values that cannot train or run
(epochs, learning rates, batch sizes), the device, the model file, the task file and direction
files (read and checked: finite, non-zero, full rank).

An experiment config declares `sites:` (the site kinds it can patch; empty = any) and `ignores:`
(top-level keys it never reads, e.g. `site` for `ioi_alignment`); a command-line override of an
ignored key is refused rather than silently dropped.
"""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import get_type_hints

from omegaconf import DictConfig, OmegaConf

from mlpim.errors import MlpimError


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


def check_direction_file(
    key: str, path: str | None, site: str | None = None, layer: int | None = None
) -> None:
    """A direction file is readable as what it is named, and holds a meaningful direction."""
    from mlpim.engine.subspace import load_subspace

    if not path:
        return
    try:
        load_subspace(path, site, layer)
    except MlpimError as e:
        raise MlpimError(f"{key}={e}") from None


def model_sizes(cfg: DictConfig) -> dict:
    """The sizes the model config declares (`model.sizes`, or the tiny model's), else {}."""
    return dict(cfg.model.get("sizes") or cfg.model.get("tiny") or {})


def site_width(cfg: DictConfig) -> int | None:
    """The site's width when the model config gives it, else None."""
    return model_sizes(cfg).get("d_mlp" if cfg.site.kind == "mlp_post" else "d_model")


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[tuple[str, list]]:
    """(key, the known keys at its level) of every key of `node` its dataclass `schema` lacks."""
    hints = get_type_hints(schema)
    known = [f.name for f in fields(schema)]
    out = []
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in known:
            out.append((f"{prefix}{key}", known))
        elif is_dataclass(hints[key]) and isinstance(node.get(key), DictConfig):
            out += unknown_keys(node[key], hints[key], f"{prefix}{key}.")
    return out


def check_unknown_keys(cfg: DictConfig) -> None:
    """A key added with `+key=` or `++key=` slips past the typed schema: refuse it like a typo."""
    from mlpim.config import Config

    found = unknown_keys(cfg, Config)
    if not found:
        return
    key, known = found[0]
    parent, name = key.rpartition(".")[0], key.rpartition(".")[2]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    raise MlpimError(
        f"unknown option {key} (added with + or ++, so Hydra accepted it; mlpim would ignore "
        f"it): {hint}known {parent or 'top-level'} options: {', '.join(known)}"
    )


def check_positive(cfg: DictConfig) -> None:
    """Epochs, steps, learning rates and batch sizes that cannot train or run are refused."""
    ignores = set(cfg.get("ignores") or [])
    values = {
        "dataset.batch_size": 1,
        "extra.batch_size": 1,
        "extra.das_lr": 0.0,
        "extra.das_steps": 1,
        "extra.pair_steps": 1,
        "extra.random_mlp_epochs": 1,
    }
    if "method" not in ignores and cfg.method.name in ("das", "mean_diff"):
        values |= {"method.epochs": 1, "method.lr": 0.0}  # DAS trains with them
    for key, low in values.items():
        if key.split(".")[0] in ignores:
            continue
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        ok = value >= low if isinstance(low, int) else value > low  # NaN fails both
        if not ok:
            need = f"at least {low}" if isinstance(low, int) else "above 0"
            raise MlpimError(f"{key}={value}: must be {need} (nothing would be learned or run)")


def check_device(cfg: DictConfig) -> None:
    """`device=` names a device torch knows and this machine has."""
    import torch

    if "device" in (cfg.get("ignores") or []) or cfg.device == "auto":
        return
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise MlpimError(f"device={cfg.device}: not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MlpimError(
            f"device={cfg.device}: CUDA is not available on this machine (torch "
            f"{torch.__version__}); use device=cpu, or device=auto to use a GPU when there is one"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise MlpimError(
            f"device={cfg.device}: this machine has {torch.cuda.device_count()} GPU(s)"
        )


def check_model_file(cfg: DictConfig) -> None:
    """A GGUF model file exists and is a GGUF file (a GGUF without its file is refused)."""
    from mlpim.engine.models import gguf_path

    if "model" in (cfg.get("ignores") or []) or cfg.model.source != "gguf":
        return
    if OmegaConf.is_missing(cfg.model, "file"):
        raise MlpimError("model=gguf needs the file: model.file=/path/to/model.gguf")
    gguf_path(cfg.model)


def check_task_file(cfg: DictConfig) -> None:
    """`dataset.path` of a task read from a file: given (pairs), and a readable file."""
    if "dataset" in (cfg.get("ignores") or []) or cfg.dataset.name not in ("pairs", "facts"):
        return
    if OmegaConf.is_missing(cfg.dataset, "path") or (
        cfg.dataset.name == "pairs" and not cfg.dataset.path
    ):
        raise MlpimError("dataset=pairs needs the task file: dataset.path=/path/to/task.jsonl")
    path = cfg.dataset.path
    if path and not Path(path).is_file():
        what = "a directory" if Path(path).is_dir() else "no such file"
        raise MlpimError(f"dataset.path={path}: {what}; give a JSONL file of pairs (README)")


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
    check_unknown_keys(cfg)
    check_positive(cfg)
    check_device(cfg)
    check_dtype(cfg)
    ignores = set(cfg.get("ignores") or [])
    if "direction" not in ignores:
        site = (cfg.get("direction_site"), cfg.get("direction_layer"))
        check_direction_file("direction", cfg.get("direction"), *site)
    extra = cfg.get("extra") or {}
    check_direction_file("extra.resid_direction", extra.get("resid_direction"))
    check_site_and_dim(cfg)
    check_task_file(cfg)
    check_model_file(cfg)
