"""Steps runners share: the engine's settings from a config, the model, site and pairs of a
config, and DAS directions loaded or trained (a trained one is saved in the run directory)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from jaxtyping import Float
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mlpim import constants as C
from mlpim.analysis.measure import natural_acts
from mlpim.engine.batch import PromptBatch, left_pad
from mlpim.engine.das import DasSettings, train_das
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import Prepared, prepare
from mlpim.engine.metrics import MIN_CLEAN_LD
from mlpim.engine.models import ModelSpec, load_model, resolve_device, site_width, validate_site
from mlpim.engine.patching import logits_end
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.errors import ConfigError
from mlpim.report import io
from mlpim.report.io import JsonStore
from mlpim.tasks import FILE_TASKS, IOI_ONLY, bos_id, pad_id, task_splits, task_vocabulary
from mlpim.tasks.ioi import held_out_pairs, make_prompts

log = logging.getLogger(__name__)


def model_spec(cfg: DictConfig) -> ModelSpec:
    """The config's `model.*` as the engine's `ModelSpec` (plain values)."""
    return ModelSpec.from_mapping(OmegaConf.to_container(cfg.model, resolve=True))


def das_settings(cfg: DictConfig, reference: bool = False, **changes) -> DasSettings:
    """The config's `method.*` as the engine's `DasSettings`, with `changes` applied; runs stop
    once converged where `method.early_stop` says so (`reference`: a random-MLP reference run)."""
    m = cfg.method
    values = {"dim": m.dim, "lr": m.lr, "lr_end_factor": m.lr_end_factor, "epochs": m.epochs}
    if m.early_stop in (("reference", "all") if reference else ("all",)):
        values |= {"stop_tol": m.stop_tol, "stop_patience": m.stop_patience}
    return DasSettings(**(values | changes))


def model_for(cfg: DictConfig):
    """The config's model on the config's device (the tiny model gets the task's vocabulary)."""
    vocab = task_vocabulary(cfg.dataset) if cfg.model.source == "tiny" else None
    return load_model(model_spec(cfg), resolve_device(cfg.device), vocab=vocab)


def require_ioi(cfg: DictConfig) -> None:
    """Stop with one line when an IOI-only experiment is given another task."""
    if cfg.dataset.name != "ioi":
        raise ConfigError(f"{cfg.experiment} got dataset={cfg.dataset.name}: {IOI_ONLY}")


def predictor(model, batch_size: int = 32):
    """A function: prompt texts -> the model's argmax next-token ids (prompts start with BOS)."""
    tok = model.tokenizer

    def predict(texts: list[str]) -> list[int]:
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            rows = [[bos_id(tok), *tok(t, add_special_tokens=False).input_ids] for t in chunk]
            tokens, mask, _ = left_pad(rows, pad_id(tok))
            end = torch.full((len(rows),), tokens.shape[1] - 1)
            batch = PromptBatch(tokens=tokens, mask=mask, pos=end, answer=end, other=end)
            batch = batch.to(model.cfg.device)
            with torch.no_grad():
                out += logits_end(model, batch).argmax(-1).tolist()
        return out

    return predict


def no_landmark(cfg: DictConfig, what: str, setting: str) -> ConfigError:
    """The refusal for a model config without a landmark for `what`; `setting` takes the layer."""
    peak = cfg.model.get("signal_peak")
    hint = (
        f"its config names the signal block {peak} (signal_peak): set {setting.format(peak)}"
        if peak is not None
        else f"set {setting.format('...')} (experiment=ioi_locate suggests one)"
    )
    return ConfigError(f"model {cfg.model.name!r} has no landmark for {what}; {hint}")


def site_of(cfg: DictConfig, model) -> tuple[str, int]:
    """(kind, layer) of the configured site, checked against the model."""
    if cfg.site.layer is None:
        raise no_landmark(cfg, cfg.site.kind, "site.layer={}")
    validate_site(model, cfg.site.kind, cfg.site.layer)
    return cfg.site.kind, int(cfg.site.layer)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG; returns a CPU generator seeded the same."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def paper_splits(
    cfg: DictConfig,
    model,
    kind: str,
    layer: int,
    held_out: bool = False,
    also: tuple[str, ...] = (),
) -> dict[str, list[Prepared]]:
    """The task's train and test pairs (IOI: the paper's DAS data), prepared at (kind, layer)
    with `method.engine`, reading the hooks `also` in the same runs. `held_out` adds, for IOI,
    "new templates" and "new names" (pairs that hold out one of the two at a time;
    `mlpim.tasks.ioi.held_out_pairs`)."""
    n_ctx = model.cfg.n_ctx
    batches = task_splits(model.tokenizer, cfg.dataset, cfg.seed, predictor(model), n_ctx)
    if held_out and cfg.dataset.name == "ioi":
        batches |= held_out_pairs(model.tokenizer, cfg.dataset, cfg.seed)
    dev = model.cfg.device
    prepared = {
        s: prepare(model, [b.to(dev) for b in bs], kind, layer, cfg.method.engine, also)
        for s, bs in batches.items()
    }
    if cfg.dataset.name in FILE_TASKS:
        warn_small_clean_ld(prepared, cfg.dataset.get("keep", "all"))
    return prepared


def warn_small_clean_ld(splits: dict[str, list[Prepared]], keep: str) -> None:
    """One WARNING, before any training, when the pairs' mean clean logit difference is below
    `MIN_CLEAN_LD`: FLDD divides by it (engine/metrics.py)."""
    ld = torch.cat([p.clean_ld for ps in splits.values() for p in ps])
    mean = float(ld.mean())
    if mean >= MIN_CLEAN_LD:
        return
    kept = "kept pairs (dataset.keep=known)" if keep == "known" else "pairs"
    hint = (
        "" if keep == "known" else "; keep the pairs the model gets right with dataset.keep=known"
    )
    log.warning(
        "the %d %s have a mean clean logit difference of %.3g nat, below %.3g: FLDD = 1 - "
        "LD_patched / LD_clean divides by it, so FLDD means little here%s",
        len(ld),
        kept,
        mean,
        MIN_CLEAN_LD,
        hint,
    )


def saved_or_trained(
    cfg: DictConfig,
    model,
    kind: str,
    layer: int,
    direction: Direction | None,
    *,
    history: Path,
    save_as: Path,
    splits: dict[str, list[Prepared]] | None = None,
) -> torch.Tensor:
    """A DAS basis (d×k) at (kind, layer): the given `direction` (a file that does not say its
    site is taken to be of this one), else trained on the paper's pairs.

    A trained basis is saved at `save_as` (reusable as `direction=`), its history at `history`.
    """
    d = site_width(model, kind)
    if direction is not None:
        return direction.fitted(model, kind, layer).to(model.cfg.device)
    if cfg.method.dim > d:
        raise ConfigError(f"method.dim={cfg.method.dim} exceeds the width {d} of {kind}")
    splits = splits or paper_splits(cfg, model, kind, layer)
    rot, hist = train_das(model, splits["train"], splits["test"], das_settings(cfg), cfg.seed)
    history.parent.mkdir(parents=True, exist_ok=True)
    io.write_csv(hist, history.parent, history.name)
    basis = rot.basis.detach()
    meta = direction_meta(model, model_spec(cfg), kind, layer)
    save_subspace(save_as, basis, **meta, k=basis.shape[1], seed=cfg.seed, method="das")
    return basis


def das_direction(
    cfg: DictConfig,
    model,
    kind: str,
    layer: int,
    direction: Direction | None,
    run_dir: Path,
    splits: dict[str, list[Prepared]] | None = None,
) -> Float[Tensor, " d"]:
    """A 1-D DAS direction at (kind, layer): the given `direction`, else trained (saved in
    run_dir)."""
    if cfg.method.name != "das" or cfg.method.dim != 1:
        raise ConfigError(f"needs a 1-D DAS direction (method=das method.dim=1), got {cfg.method}")
    basis = saved_or_trained(
        cfg,
        model,
        kind,
        layer,
        direction,
        history=run_dir / C.HISTORY,
        save_as=run_dir / C.DIRECTION,
        splits=splits,
    )
    if basis.shape[1] != 1:
        where = direction.path if direction is not None else "the trained basis"
        raise ConfigError(f"{where} holds a {basis.shape[1]}-D subspace; a direction is 1-D")
    return basis[:, 0]


def das_basis(
    cfg: DictConfig,
    model,
    kind: str,
    layer: int,
    direction: Direction | None,
    run_dir: Path,
    splits: dict[str, list[Prepared]] | None = None,
) -> Float[Tensor, "d k"]:
    """The DAS basis at (kind, layer): the given `direction`, else trained as the subspace runner
    does.

    A trained basis is saved as `v_{kind}_L{layer}.pt` (reusable as `direction=`), its training
    history under `das_{kind}_L{layer}/`.
    """
    return saved_or_trained(
        cfg,
        model,
        kind,
        layer,
        direction,
        history=run_dir / f"das_{kind}_L{layer}" / C.HISTORY,
        save_as=run_dir / f"v_{kind}_L{layer}.pt",
        splits=splits,
    )


NATURAL_PATTERNS = ("ABB", "BAB", "ABA", "BAA")


def natural_site_acts(
    cfg: DictConfig,
    model,
    kind: str,
    layers: list[int],
    n_prompts: int,
    splits=None,
    split: str = "test",
) -> dict[int, Tensor]:
    """{layer: END activations of `n_prompts` IOI prompts of all four patterns}, drawn from
    `split` (test: the held-out templates and names the checks' pairs come from); on another
    task, the base and source activations of that split's pairs (`splits`)."""
    if cfg.dataset.name != "ioi":
        pairs = splits[split]
        return {layers[0]: torch.cat([p.base_act for p in pairs] + [p.source_act for p in pairs])}
    seed = int(cfg.seed) + 7919  # not the pairs' draw
    prompts = make_prompts(model.tokenizer, cfg.dataset, split, NATURAL_PATTERNS, n_prompts, seed)
    return natural_acts(model, prompts, kind, layers)


def reference_store(path: str | None):
    """The file-backed store of measured references at `path` (None: no cache)."""
    return JsonStore(path) if path else None


def saved_direction(
    direction: Direction, model, model_name: str, kinds: tuple[str, ...] | None = None
) -> tuple[str, int, Float[Tensor, "d k"]]:
    """(site, layer, basis with unit columns) of a direction or subspace that says its site and
    layer (preflight's check), checked against the model."""
    kind, layer = direction.site, int(direction.layer)
    if kinds is not None and kind not in kinds:
        raise ConfigError(
            f"{direction.path} holds a {kind} subspace; expected one of {', '.join(kinds)}"
        )
    if (direction.model or model_name) != model_name:
        log.warning(
            "%s was found on %s, checked on %s", direction.path, direction.model, model_name
        )
    validate_site(model, kind, layer)
    v = direction.fitted(model, kind, layer).to(model.cfg.device)
    return kind, layer, v / v.norm(dim=0)
