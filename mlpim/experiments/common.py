"""Shared steps of runners: load the model for a config, validate the site, plots."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from mlpim.engine.interventions import Prepared, prepare
from mlpim.engine.models import ConfigError, load_model, resolve_device, validate_site
from mlpim.tasks.ioi import paper_pairs
from mlpim.tasks.tokenizer import ioi_vocabulary


def model_for(cfg: DictConfig):
    """The config's model on the config's device (the tiny model gets the IOI vocabulary)."""
    vocab = ioi_vocabulary(cfg.dataset) if cfg.model.source == "tiny" else None
    return load_model(cfg.model, resolve_device(cfg.device), vocab=vocab)


def site_of(cfg: DictConfig, model) -> tuple[str, int]:
    """(kind, layer) of the configured site, checked against the model."""
    if cfg.site.layer is None:
        raise ConfigError(
            f"model {cfg.model.name!r} has no landmark for {cfg.site.kind}; set site.layer=... "
            "(experiment=ioi_locate suggests one)"
        )
    validate_site(model, cfg.site.kind, cfg.site.layer)
    return cfg.site.kind, int(cfg.site.layer)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def site_width(model, kind: str) -> int:
    """Width of a site's activation: d_mlp for `mlp_post`, else d_model."""
    return model.cfg.d_mlp if kind == "mlp_post" else model.cfg.d_model


def paper_splits(cfg: DictConfig, model, kind: str, layer: int) -> dict[str, list[Prepared]]:
    """The paper's DAS train and test pairs, prepared at (kind, layer) (`method.engine`)."""
    dev, fast = model.cfg.device, cfg.method.engine
    return {
        s: prepare(model, [b.to(dev) for b in paper_pairs(model.tokenizer, cfg.dataset, s, cfg.seed)],
                   kind, layer, fast)
        for s in ("train", "test")
    }  # fmt: skip
