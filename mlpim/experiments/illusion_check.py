"""illusion_check: is a saved direction, or k-dim subspace, an MLP-in-the-middle illusion?

The direction (`direction=path/to/subspace.pt`, required) is checked whole: one direction or a
subspace of up to `MAX_K` dimensions (one verdict on the subspace; k = 1 is a direction); its site
and layer are read from the file. The checks (`mlpim.analysis.checks`, measured by
`mlpim.analysis.measure`) run on the task's test pairs, each with a bootstrap interval over the
pairs and placed in a reference measured on the same model, site and task
(`mlpim.analysis.illusion_site`). The direction checks decide the verdict; the site checks
describe the site (docs/verdict-rule.md). The random-MLP reference is kept by content hash in
`extra.reference_cache` and shared by every direction checked at that site; the site's prepared
pairs, natural activations and random and natural references are kept the same way in
`extra.activation_cache` (`mlpim.reuse.persist`). Writes metrics.csv, verdict.md (also
summary.md), illusion_check.png; for a k-dim subspace (k ≥ 2) also which part of V does it
(`mlpim.analysis.breakdown`, a table and no verdict): breakdown.csv, breakdown.png and a section
of verdict.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from torch import Tensor

from mlpim import constants as C
from mlpim import reuse
from mlpim.analysis import illusion
from mlpim.analysis import illusion_site as S
from mlpim.analysis.breakdown import breakdown
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.controls import mlp_reads
from mlpim.analysis.measure import SiteData, measure_checks
from mlpim.engine.das import DasSettings
from mlpim.engine.direction import Direction
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import (
    das_settings,
    model_for,
    natural_site_acts,
    paper_splits,
    reference_store,
    saved_direction,
)
from mlpim.options import IllusionCheckOptions, options
from mlpim.report import illusion as report
from mlpim.report import io

log = logging.getLogger(__name__)
PLOT = report.CHECK_PLOT
RESID_KINDS = ("resid_pre", "resid_post")
KEPT = ("prepare", "natural", "random_dirs", "natural_refs")  # on disk: extra.activation_cache
MAX_K = 16  # the largest subspace checked whole (the dormant check's covariance is k×k)


def check_options(cfg: DictConfig, opts: IllusionCheckOptions, k: int) -> S.CheckOptions:
    """How much of each reference to measure, for subspaces of dimension k."""
    return S.CheckOptions(
        n_random_directions=opts.n_random_directions,
        n_natural=opts.n_natural,
        random_mlp_seeds=opts.random_mlp_seeds,
        seed=int(cfg.seed),
        k=k,
        reference_mode=opts.reference_mode,
    )


def random_mlp_method(cfg: DictConfig, opts: IllusionCheckOptions, k: int) -> DasSettings:
    """DAS for the random-MLP runs: of the subspace's dimension k, as many epochs as the
    direction's training, stopped once converged (`method.early_stop`)."""
    epochs = int(opts.random_mlp_epochs or cfg.method.epochs)
    return das_settings(cfg, reference=True, dim=k, epochs=epochs)


def site_of_check(
    cfg: DictConfig,
    opts: IllusionCheckOptions,
    model,
    kind: str,
    layer: int,
    th: Thresholds,
    k: int,
) -> tuple[SiteData, dict]:
    """The site's pairs, natural activations and references (`S.check_site`); the random-MLP
    runs' histories. At an MLP the preparation also reads what the random-MLP reference needs
    (`mlp_reads`), so that the batched reference runs no prompt again."""
    shared = kind == "mlp_post" and opts.random_mlp_seeds > 0 and opts.reference_mode == "batched"
    also = mlp_reads(layer) if shared else ()
    splits = paper_splits(cfg, model, kind, layer, held_out=True, also=also)
    natural = None
    if kind == "mlp_post":
        natural = natural_site_acts(cfg, model, kind, [layer], opts.n_natural_prompts, splits)
        natural = natural[layer]
    return S.check_site(
        model,
        splits,
        kind,
        layer,
        th,
        check_options(cfg, opts, k),
        natural,
        random_mlp_method(cfg, opts, k),
        reference_store(opts.reference_cache),
    )


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """The checks and the verdict for `direction=`; the metrics."""
    if "direction" not in directions:
        raise ConfigError(
            "illusion_check needs a saved direction or subspace: direction=path/to/subspace.pt"
        )
    opts = options(cfg, IllusionCheckOptions)
    model = model_for(cfg)
    kind, layer, v = saved_direction(directions["direction"], model, cfg.model.name)
    v_ref = reference_direction(directions.get("extra.resid_direction"), model, cfg.model.name)
    k = v.shape[1]
    th, keys = Thresholds.from_mapping(cfg.check), {"site": kind, "layer": layer, "dim": k}
    with reuse.persist(opts.activation_cache, KEPT):
        site, histories = site_of_check(cfg, opts, model, kind, layer, th, k)
    for seed, hist in histories.items():
        io.write_csv(hist, run_dir, f"history_random_mlp_seed{seed}.csv")
    rows, checks = measure_checks(model, site, v, keys, v_ref, opts.n_random)
    verdict = illusion.verdict(checks)
    part = which_part(model, site, v, opts, int(cfg.seed), run_dir, cfg.model.name) if k > 1 else ""
    header = (
        f"model: {cfg.model.name}; direction: {cfg.direction} ({kind}, layer {layer}"
        f"{f', a {k}-dim subspace checked whole' if k > 1 else ''}); "
        f"seed {cfg.seed}; FLDDs on the test pairs, {th.ci_level:.0%} bootstrap intervals"
    )
    for name in (C.VERDICT, C.SUMMARY):
        io.write_text(report.verdict_markdown(header, verdict, th.ci_level) + part, run_dir, name)
    title = f"{cfg.model.name}, {kind} L{layer}{f' k={k}' if k > 1 else ''}: {verdict.label}"
    report.verdict_plot(verdict, run_dir, f"illusion_check {Path(cfg.direction).name} ({title})")
    return io.tidy(rows + verdict.to_rows(keys), cfg)


def which_part(
    model,
    site: SiteData,
    v: Tensor,
    opts: IllusionCheckOptions,
    seed: int,
    run_dir: Path,
    name: str,
) -> str:
    """Which part of the k-dim V does it: breakdown.csv, breakdown.png, the console; its section
    of verdict.md."""
    table = breakdown(model, site, v, opts.n_random_directions, seed)
    io.write_csv(table, run_dir, report.BREAKDOWN)
    title = f"{name}, {site.kind} L{site.layer} k={v.shape[1]}: which part of V does it"
    report.breakdown_plot(table, run_dir, title)
    text = report.breakdown_markdown(table, site.th.ci_level)
    log.info("%s", text)
    return text


def reference_direction(resid: Direction | None, model, model_name: str) -> Tensor | None:
    """The unit residual direction of `extra.resid_direction` (None when not given); one
    direction, the alignment's reference."""
    if resid is None:
        return None
    v = saved_direction(resid, model, model_name, RESID_KINDS)[2]
    if v.shape[1] != 1:
        raise ConfigError(
            f"extra.resid_direction={resid.path} holds a {v.shape[1]}-D subspace; the alignment "
            "reference is one residual direction"
        )
    return v[:, 0]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """The verdict table from a metrics table alone: one row per check and the verdict."""
    return S.summary_table(illusion.Verdict.from_rows(df))


EXPERIMENT = Experiment(
    run=run,
    options=IllusionCheckOptions,
    summarize=summarize,
    inputs={"extra.resid_direction": None},
    max_k=MAX_K,
    positive=("random_mlp_epochs",),
)
