"""illusion_check: is a saved 1-D direction an MLP-in-the-middle illusion?

The direction (`direction=path/to/subspace.pt`, required) must be 1-D; its site and layer are read
from the file. The checks (`mlpim.analysis.illusion`, measured by `mlpim.analysis.measure`) run on
the task's test pairs, each with a bootstrap interval over the pairs and placed in a reference
measured on the same model, site and task (`mlpim.analysis.illusion_site`). The direction checks
decide the verdict; the site checks describe the site (docs/verdict-rule.md). The random-MLP
reference is kept by content hash in `extra.reference_cache` and shared by every direction
checked at that site. Writes metrics.csv, verdict.md (also summary.md), illusion_check.png.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mlpim import constants as C
from mlpim.analysis import illusion
from mlpim.analysis import illusion_site as S
from mlpim.analysis.directions import saved_direction
from mlpim.analysis.measure import measure_checks
from mlpim.engine.models import ConfigError
from mlpim.experiments.common import model_for, natural_site_acts, paper_splits, reference_store
from mlpim.report import illusion as report
from mlpim.report import io

log = logging.getLogger(__name__)
PLOT = report.CHECK_PLOT
RESID_KINDS = ("resid_pre", "resid_post")


def options(cfg: DictConfig) -> S.CheckOptions:
    """How much of each reference to measure (`extra.*`)."""
    e = cfg.extra
    return S.CheckOptions(
        n_random_directions=int(e.n_random_directions),
        n_natural=int(e.n_natural),
        random_mlp_seeds=int(e.random_mlp_seeds),
        seed=int(cfg.seed),
    )


def random_mlp_method(cfg: DictConfig) -> DictConfig:
    """`method.*` for the random-MLP DAS runs: 1-D, as many epochs as the direction's training."""
    epochs = cfg.extra.random_mlp_epochs or cfg.method.epochs
    return OmegaConf.merge(cfg.method, {"dim": 1, "epochs": int(epochs)})


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    if not cfg.direction:
        raise ConfigError(
            "illusion_check needs a saved 1-D subspace: direction=path/to/subspace.pt"
        )
    model = model_for(cfg)
    where = (cfg.direction_site, cfg.direction_layer)
    kind, layer, v = saved_direction(cfg.direction, model, cfg.model.name, site=where)
    path = cfg.extra.resid_direction
    v_ref = saved_direction(path, model, cfg.model.name, RESID_KINDS)[2] if path else None
    th, keys = illusion.Thresholds.from_mapping(cfg.check), {"site": kind, "layer": layer, "dim": 1}
    splits = paper_splits(cfg, model, kind, layer, held_out=True)
    natural = (
        natural_site_acts(cfg, model, kind, [layer], splits)[layer] if kind == "mlp_post" else None
    )
    site, histories = S.check_site(
        model,
        splits,
        kind,
        layer,
        th,
        options(cfg),
        natural,
        random_mlp_method(cfg),
        reference_store(cfg),
    )
    for seed, hist in histories.items():
        io.write_csv(hist, run_dir, f"history_random_mlp_seed{seed}.csv")
    rows, checks = measure_checks(model, site, v, keys, v_ref, int(cfg.extra.n_random))
    header = (
        f"model: {cfg.model.name}; direction: {cfg.direction} ({kind}, layer {layer}); "
        f"seed {cfg.seed}; FLDDs on the test pairs, {th.ci_level:.0%} bootstrap intervals"
    )
    for name in (C.VERDICT, C.SUMMARY):
        io.write_text(report.verdict_markdown(header, checks, th.ci_level), run_dir, name)
    title = f"{cfg.model.name}, {kind} L{layer}: {illusion.verdict(checks).label}"
    report.verdict_plot(checks, run_dir, f"illusion_check {Path(cfg.direction).name} ({title})")
    return io.tidy(rows + S.check_rows(checks, keys), cfg)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """The verdict table from a metrics table: one row per check and the verdict."""
    return S.summary_table(S.checks_from_rows(df))
