"""Shared steps of runners: load the model for a config, validate the site, plots."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from mlpim.data.tokenizer import ioi_vocabulary
from mlpim.models import load_model, resolve_device, validate_site


def model_for(cfg: DictConfig):
    """The config's model on the config's device (the tiny model gets the IOI vocabulary)."""
    vocab = ioi_vocabulary(cfg.dataset) if cfg.model.source == "tiny" else None
    return load_model(cfg.model, resolve_device(cfg.device), vocab=vocab)


def site_of(cfg: DictConfig, model) -> tuple[str, int]:
    """(kind, layer) of the configured site, checked against the model."""
    validate_site(model, cfg.site.kind, cfg.site.layer)
    return cfg.site.kind, int(cfg.site.layer)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
