"""Shared steps of runners: load the model for a config, validate the site, plots."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from mlpim.engine.interventions import Prepared, prepare
from mlpim.engine.models import ConfigError, load_model, resolve_device, validate_site
from mlpim.engine.patching import logits_end
from mlpim.tasks import IOI_ONLY, bos_id, pad_id, task_splits, task_vocabulary
from mlpim.tasks.batch import PromptBatch, left_pad
from mlpim.tasks.ioi import held_out_pairs


def model_for(cfg: DictConfig):
    """The config's model on the config's device (the tiny model gets the task's vocabulary)."""
    vocab = task_vocabulary(cfg.dataset) if cfg.model.source == "tiny" else None
    return load_model(cfg.model, resolve_device(cfg.device), vocab=vocab)


def require_ioi(cfg: DictConfig) -> None:
    """Stop with one line when an IOI-only experiment is given another task."""
    if cfg.dataset.name != "ioi":
        raise ConfigError(f"{cfg.experiment} got dataset={cfg.dataset.name}: {IOI_ONLY}")


def predictor(model, batch_size: int = 32):
    """prompt texts -> the model's argmax next-token ids (prompts start with BOS)."""
    tok = model.tokenizer

    def predict(texts: list[str]) -> list[int]:
        out = []
        for i in range(0, len(texts), batch_size):
            rows = [[bos_id(tok), *tok(t, add_special_tokens=False).input_ids]
                    for t in texts[i : i + batch_size]]  # fmt: skip
            tokens, mask, _ = left_pad(rows, pad_id(tok))
            end = torch.full((len(rows),), tokens.shape[1] - 1)
            batch = PromptBatch(tokens, mask, end, end, end).to(model.cfg.device)
            with torch.no_grad():
                out += logits_end(model, batch).argmax(-1).tolist()
        return out

    return predict


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


def paper_splits(
    cfg: DictConfig, model, kind: str, layer: int, held_out: bool = False
) -> dict[str, list[Prepared]]:
    """The task's train and test pairs (IOI: the paper's DAS data), prepared at (kind, layer)
    with `method.engine`. `held_out` adds, for IOI, "new templates" and "new names" (pairs that
    hold out one of the two at a time; `mlpim.tasks.ioi.held_out_pairs`)."""
    batches = task_splits(model.tokenizer, cfg.dataset, cfg.seed, predictor(model), model.cfg.n_ctx)
    if held_out and cfg.dataset.name == "ioi":
        batches |= held_out_pairs(model.tokenizer, cfg.dataset, cfg.seed)
    dev = model.cfg.device
    return {s: prepare(model, [b.to(dev) for b in bs], kind, layer, cfg.method.engine)
            for s, bs in batches.items()}  # fmt: skip


NATURAL_PATTERNS = ("ABB", "BAB", "ABA", "BAA")


def natural_site_acts(cfg: DictConfig, model, kind: str, layers: list[int], splits=None):
    """{layer: END activations of `extra.n_natural_prompts` IOI prompts (all patterns)}."""
    from mlpim.analysis.measure import natural_acts
    from mlpim.tasks.ioi import make_prompts

    if cfg.dataset.name != "ioi":
        train = splits["train"]
        return {layers[0]: torch.cat([p.base_act for p in train] + [p.source_act for p in train])}
    n, seed = int(cfg.extra.n_natural_prompts), int(cfg.seed) + 7919  # not the pairs' draw
    prompts = make_prompts(model.tokenizer, cfg.dataset, "train", NATURAL_PATTERNS, n, seed)
    return natural_acts(model, prompts, kind, layers)


def reference_store(cfg: DictConfig):
    """The file-backed store of measured references (`extra.reference_cache`; None: no cache)."""
    from mlpim.report.io import JsonStore

    path = cfg.extra.get("reference_cache")
    return JsonStore(path) if path else None
