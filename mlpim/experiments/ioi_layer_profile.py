"""ioi_layer_profile: where the illusion lives. Per layer, DAS on mlp_post next to the full-MLP
patch and DAS on resid_post next to the full residual patch (test FLDD, IIA, flip rate), and the
share of v_MLP's squared norm in W_out's nullspace.

The task's pairs are built once; each batch's base and source prompts run once for all sites
(`analysis.profile.prepare_many`). Each site's DAS run, evaluation and rows are those of a
single-layer `ioi_mlp8_das` / `ioi_resid8_das` run with the same seed and epochs.

Layers: `extra.layers` (a list), else `extra.first_layer`..`extra.last_layer`, where an end left
null comes from `extra.locate_run` (an ioi_locate run: its signal range, see
`landmarks.signal_range`) or else from the model's landmarks, widened by `extra.window` layers.
The measurement is `mlpim.analysis.profile.profile_site`; the table and figure are
`mlpim.report.layer_profile`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from mlpim import constants as C
from mlpim.analysis import landmarks as lmk
from mlpim.analysis.profile import prepare_many, profile_site
from mlpim.engine.direction import Direction
from mlpim.engine.models import site_width
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import das_settings, model_for, model_spec, predictor
from mlpim.options import IoiLayerProfileOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.report.layer_profile import profile_plot, summarize, summary_markdown
from mlpim.tasks import task_splits

log = logging.getLogger(__name__)
KINDS = ("mlp_post", "resid_post")
DIRECTIONS = "directions"


def read_locate(path: str | None) -> pd.DataFrame | None:
    """The metrics table of an ioi_locate run (its directory or its metrics.csv)."""
    if not path:
        return None
    p = Path(path)
    p = p / C.METRICS if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"extra.locate_run={path}: no ioi_locate {C.METRICS} there")
    return pd.read_csv(p)


def default_range(cfg: DictConfig, locate: pd.DataFrame | None) -> tuple[int, int, str]:
    """(first, last, why) before widening: the locate run's signal range, else the landmarks."""
    opts = options(cfg, Options)
    thr = opts.signal_threshold
    if locate is not None:
        found = lmk.signal_range(locate, thr)
        if found is None:
            raise ConfigError(f"extra.locate_run: no layer's patch has FLDD >= {thr}")
        return *found, f"signal range of {opts.locate_run} (FLDD >= {thr})"
    marks = cfg.model.landmarks
    known = [x for x in (marks.handover_layer, marks.mlp_in_the_middle) if x is not None]
    if not known:
        raise ConfigError(
            f"model {cfg.model.name!r} has no landmarks: give extra.layers=[...], "
            "extra.first_layer/extra.last_layer, or extra.locate_run=<ioi_locate run>"
        )
    return min(known), max(known), f"landmarks of {cfg.model.name}"


def profile_layers(
    cfg: DictConfig, n_layers: int, locate: pd.DataFrame | None
) -> tuple[list[int], str]:
    """The layers to profile and how they were chosen."""
    opts = options(cfg, Options)
    if opts.layers is not None:
        layers, why = sorted({int(x) for x in opts.layers}), "extra.layers"
    else:
        first, last = opts.first_layer, opts.last_layer
        why = "extra.first_layer/last_layer"
        if first is None or last is None:
            lo, hi, why = default_range(cfg, locate)
            w = opts.window
            first = max(lo - w, 0) if first is None else first
            last = min(hi + w, n_layers - 1) if last is None else last
            why += f" ± {w}"
        layers = list(range(int(first), int(last) + 1))
    if not layers or not 0 <= layers[0] <= layers[-1] < n_layers:
        raise ConfigError(f"profile layers {layers} must be non-empty, within 0..{n_layers - 1}")
    return layers, why


def check_method(cfg: DictConfig, model) -> None:
    """DAS only, with a dimension both sites can hold."""
    if cfg.method.name != "das":
        raise ConfigError(f"ioi_layer_profile trains DAS (method=das), got {cfg.method.name!r}")
    width = min(site_width(model, k) for k in KINDS)
    if not 1 <= cfg.method.dim <= width:
        raise ConfigError(f"method.dim={cfg.method.dim}: allowed 1..{width} (both sites)")


def site_rows(
    cfg: DictConfig, model, kind: str, layer: int, splits: dict, run_dir: Path
) -> tuple[list[dict], pd.DataFrame]:
    """One site's rows (`profile_site`); its direction saved under `directions/`."""
    start = time.time()
    rows, basis, test, hist = profile_site(model, kind, layer, splits, das_settings(cfg), cfg.seed)
    (run_dir / DIRECTIONS).mkdir(parents=True, exist_ok=True)
    meta = direction_meta(model, model_spec(cfg), kind, layer)
    path = run_dir / DIRECTIONS / f"{kind}_L{layer}.pt"
    k = basis.shape[1]
    save_subspace(path, basis, **meta, k=k, seed=cfg.seed, method="das", metrics=test)
    took = time.time() - start
    log.info(
        "%s L%d: %.0f s, test FLDD %.3f, IIA %.3f", kind, layer, took, test["fldd"], test["iia"]
    )
    return rows, hist.assign(site=kind, layer=layer)


def prepared_sites(cfg: DictConfig, model, sites: list[tuple[str, int]]) -> dict:
    """split -> site -> the task's pairs prepared there (one run per batch for all sites)."""
    n_ctx, dev = model.cfg.n_ctx, model.cfg.device
    batches = task_splits(model.tokenizer, cfg.dataset, cfg.seed, predictor(model), n_ctx)
    start = time.time()
    prepared = {
        s: prepare_many(model, [b.to(dev) for b in bs], sites, cfg.method.engine)
        for s, bs in batches.items()
    }
    log.info("prepared %d sites in %.0f s", len(sites), time.time() - start)
    return prepared


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """DAS and full patches at mlp_post and resid_post of every profiled layer; the metrics."""
    locate = read_locate(options(cfg, Options).locate_run)
    model = model_for(cfg)
    check_method(cfg, model)
    layers, why = profile_layers(cfg, model.cfg.n_layers, locate)
    log.info("profiling layers %s (%s)", layers, why)
    sites = [(kind, layer) for layer in layers for kind in KINDS]
    prepared = prepared_sites(cfg, model, sites)
    rows, hists = [], []
    for kind, layer in sites:
        splits = {s: prepared[s][(kind, layer)] for s in prepared}
        site_r, hist = site_rows(cfg, model, kind, layer, splits, run_dir)
        rows, hists = rows + site_r, [*hists, hist]
        for s in prepared:  # free this site's states
            prepared[s][(kind, layer)] = []
    io.write_csv(pd.concat(hists), run_dir, C.HISTORY)
    df = io.tidy(rows, cfg)
    io.write_text(summary_markdown(cfg, summarize(df), why), run_dir, C.SUMMARY)
    title = f"{cfg.model.name}: layer profile (k = {cfg.method.dim})"
    profile_plot(df, run_dir, title, cfg.model.landmarks.mlp_in_the_middle)
    return df


EXPERIMENT = Experiment(
    run=run, options=Options, summarize=summarize, inputs={"extra.locate_run": C.METRICS}
)
