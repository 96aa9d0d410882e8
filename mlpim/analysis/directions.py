"""Load or train a DAS direction: one function, and the two file layouts the experiments use."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from jaxtyping import Float
from omegaconf import DictConfig
from torch import Tensor

from mlpim import constants as C
from mlpim.analysis.controls import loaded_basis
from mlpim.engine.das import train_das
from mlpim.engine.interventions import Prepared
from mlpim.engine.models import ConfigError, site_width, validate_site
from mlpim.engine.subspace import direction_meta, load_subspace, save_subspace
from mlpim.files import atomic_write

log = logging.getLogger(__name__)


def saved_or_trained(
    cfg: DictConfig, model, kind: str, layer: int, path: str | None, *, history: Path,
    save_as: Path, splits: dict[str, list[Prepared]] | None = None,
) -> torch.Tensor:  # fmt: skip
    """A DAS basis (d×k) at (kind, layer): loaded from `path`, else trained on the paper's pairs.

    A trained basis is saved at `save_as` (reusable as `direction=`), its history at `history`.
    """
    from mlpim.experiments.common import paper_splits  # the task's pairs when none are given

    d = site_width(model, kind)
    if path:
        return loaded_basis(path, kind, layer, d, model).to(model.cfg.device)
    if cfg.method.dim > d:
        raise ConfigError(f"method.dim={cfg.method.dim} exceeds the width {d} of {kind}")
    splits = splits or paper_splits(cfg, model, kind, layer)
    rot, hist = train_das(model, splits["train"], splits["test"], cfg.method, cfg.seed)
    history.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(history, lambda p: hist.to_csv(p, index=False))
    basis = rot.basis.detach()
    save_subspace(save_as, basis, **direction_meta(model, cfg.model, kind, layer),
                  k=basis.shape[1], seed=cfg.seed, method="das")  # fmt: skip
    return basis


def das_direction(
    cfg: DictConfig, model, kind: str, layer: int, path: str | None, run_dir: Path,
    splits: dict[str, list[Prepared]] | None = None,
) -> Float[Tensor, " d"]:  # fmt: skip
    """A 1-D DAS direction at (kind, layer): loaded from `path`, else trained (saved in run_dir)."""
    if cfg.method.name != "das" or cfg.method.dim != 1:
        raise ConfigError(f"needs a 1-D DAS direction (method=das method.dim=1), got {cfg.method}")
    basis = saved_or_trained(cfg, model, kind, layer, path, history=run_dir / C.HISTORY,
                             save_as=run_dir / C.DIRECTION, splits=splits)  # fmt: skip
    if basis.shape[1] != 1:
        raise ConfigError(f"{path} holds a {basis.shape[1]}-D subspace; a direction is 1-D")
    return basis[:, 0]


def das_basis(
    cfg: DictConfig, model, kind: str, layer: int, path: str | None, run_dir: Path,
    splits: dict[str, list[Prepared]] | None = None,
) -> Float[Tensor, "d k"]:  # fmt: skip
    """The DAS basis at (kind, layer): loaded from `path`, else trained as the subspace runner does.

    A trained basis is saved as `v_{kind}_L{layer}.pt` (reusable as `direction=`), its training
    history under `das_{kind}_L{layer}/`.
    """
    return saved_or_trained(
        cfg, model, kind, layer, path, history=run_dir / f"das_{kind}_L{layer}" / C.HISTORY,
        save_as=run_dir / f"v_{kind}_L{layer}.pt", splits=splits,
    )  # fmt: skip


def saved_direction(
    path: str,
    model,
    model_name: str,
    kinds: tuple[str, ...] | None = None,
    site: tuple[str | None, int | None] = (None, None),
) -> tuple[str, int, Float[Tensor, " d"]]:
    """(site, layer, unit v) of a saved 1-D subspace, checked against the model's widths."""
    saved = load_subspace(path, *site)
    kind, layer = saved.get("site"), saved.get("layer")
    if kind is None or layer is None:
        raise ConfigError(
            f"{path} does not record the site and layer it was found at; "
            "give them as direction_site=... direction_layer=..."
        )
    if kinds is not None and kind not in kinds:
        raise ConfigError(f"{path} holds a {kind} subspace; expected one of {', '.join(kinds)}")
    if saved.get("model", model_name) != model_name:
        log.warning("%s was found on %s, checked on %s", path, saved["model"], model_name)
    validate_site(model, kind, int(layer))
    basis = loaded_basis(path, kind, int(layer), site_width(model, kind), model)
    if basis.shape[1] != 1:
        raise ConfigError(
            f"{path} holds a {basis.shape[1]}-D subspace; illusion_check checks one direction "
            "(save a single column with mlpim.engine.subspace.save_subspace)"
        )
    v = basis[:, 0].to(model.cfg.device)
    return kind, int(layer), v / v.norm()
