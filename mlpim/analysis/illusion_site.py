"""illusion_check's steps: a site's references and the printed table.

`check_site` measures what every direction checked at one site shares (random directions or
k-dim subspaces, the random-MLP DAS reference of the same dimension, the natural directions and activations). The checks' metrics.csv rows
are `illusion.Verdict.to_rows`; `Verdict.from_rows` rebuilds the verdict from them, so a finished
run's table can be recomputed from its metrics alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from torch import Tensor

from mlpim.analysis import illusion
from mlpim.analysis import measure as M
from mlpim.analysis import references as R
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.stats import mean_est
from mlpim.engine.das import DasSettings


@dataclass(frozen=True)
class CheckOptions:
    """How much of each reference to measure (config `extra.*`; 0 skips one)."""

    n_random_directions: int
    n_natural: int
    random_mlp_seeds: int
    seed: int
    k: int = 1  # the dimension of the subspaces checked (random references of the same k)
    reference_mode: str = "batched"  # random-MLP seeds: one batched problem, or serial runs


def check_site(
    model,
    splits: M.Splits,
    kind: str,
    layer: int,
    th: Thresholds,
    opts: CheckOptions,
    natural: Tensor | None,
    method: DasSettings,
    store: R.Store | None = None,
) -> tuple[M.SiteData, dict]:
    """The site's shared data and references; the random-MLP runs' histories. The site is read
    first, so that an MLP whose hidden activation @ W_out is not its output stops the run before
    any reference is measured (`measure.site_data`)."""
    site = M.site_data(model, splits, kind, layer, th, R.Refs(), natural, seed=opts.seed)
    site.refs = R.Refs(
        random_dirs=R.random_direction_reference(
            model, splits["test"], opts.n_random_directions, opts.seed, opts.k
        )
    )
    hist = {}
    if kind == "mlp_post" and opts.random_mlp_seeds > 0:
        seeds = range(opts.seed, opts.seed + opts.random_mlp_seeds)
        mode = opts.reference_mode
        ref, hist = R.random_mlp_reference(model, splits, layer, method, seeds, store, mode)
        site.refs = replace(site.refs, random_mlp=ref)
        site.random_mlp = mean_est(np.asarray(ref.values), th.n_boot, opts.seed)
    site.refs = M.natural_references(model, site, opts.n_natural)
    return site, hist


def summary_table(v: illusion.Verdict) -> pd.DataFrame:
    """The printed table: value, interval, threshold, margin, warning per check; the verdict."""
    table = illusion.verdict_table(v)
    cols = ["scope", "value", "ci_low", "ci_high", "threshold", "margin", "warning"]
    return table[cols]
