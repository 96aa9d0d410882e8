"""illusion_check's steps: a site's references, the checks as tidy rows, and back.

`check_site` measures what every direction checked at one site shares (random directions, the
random-MLP DAS reference, the natural directions and activations); `check_rows` turns the checks
into metrics.csv rows and `checks_from_rows` rebuilds them, so a finished run's verdict can be
recomputed from its metrics alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from torch import Tensor

from mlpim.analysis import illusion
from mlpim.analysis import measure as M
from mlpim.analysis import references as R
from mlpim.analysis.rows import metric_rows
from mlpim.engine.das import DasSettings

CHECK_METRICS = (
    "check_value",
    "value_low",
    "value_high",
    "threshold",
    "warning",
    "applies",
    "margin",
    "margin_low",
    "margin_high",
    "margin_se",
    "percentile",
    "z",
    "borderline",
)


@dataclass(frozen=True)
class CheckOptions:
    """How much of each reference to measure (config `extra.*`; 0 skips one)."""

    n_random_directions: int
    n_natural: int
    random_mlp_seeds: int
    seed: int


def check_site(
    model,
    splits: M.Splits,
    kind: str,
    layer: int,
    th: illusion.Thresholds,
    opts: CheckOptions,
    natural: Tensor | None,
    method: DasSettings,
    store: R.Store | None = None,
) -> tuple[M.SiteData, dict]:
    """The site's shared data and references; the random-MLP runs' histories."""
    test = splits["test"]
    refs = R.Refs(
        random_dirs=R.random_direction_reference(model, test, opts.n_random_directions, opts.seed)
    )
    rand, hist = [], {}
    if kind == "mlp_post" and opts.random_mlp_seeds > 0:
        seeds = range(opts.seed, opts.seed + opts.random_mlp_seeds)
        rand, hist = R.random_mlp_reference(model, splits, layer, method, seeds, store)
        name = f"random-MLP DAS ({len(rand)} seeds, {method.epochs} epochs)"
        refs = R.Refs(refs.random_dirs, R.Reference(name, tuple(rand)))
    site = M.site_data(model, splits, kind, layer, th, refs, natural, rand, opts.seed)
    site.refs = M.natural_references(model, site, opts.n_natural)
    return site, hist


def _flag(c: illusion.Check, b: bool) -> float:
    return math.nan if c.warning is None else float(b)


def check_rows(checks: list[illusion.Check], keys: dict) -> list[dict]:
    """Each check as tidy rows (`CHECK_METRICS`; flags 1/0/NaN) and the verdict's warnings."""
    rows = []
    for c in checks:
        values = (
            c.value,
            *c.value_ci,
            c.threshold,
            _flag(c, c.warning),
            float(c.applies),
            c.margin,
            *c.ci,
            c.se,
            c.percentile,
            c.z,
            _flag(c, c.borderline),
        )
        rows += metric_rows(
            dict(zip(CHECK_METRICS, values, strict=True)), intervention=c.name, split="test", **keys
        )
    v = illusion.verdict(checks)
    values = {"n_warnings": float(v.n_warnings), "score": illusion.illusion_score(checks)}
    return rows + metric_rows(values, intervention="verdict", split="test", **keys)


def checks_from_rows(df: pd.DataFrame) -> list[illusion.Check]:
    """The checks of a metrics table (rows of `check_rows`), in `illusion.CHECKS` order."""
    wide = df[df.metric.isin(CHECK_METRICS)].pivot_table(
        index="intervention", columns="metric", values="value", dropna=False
    )
    out = []
    for name in (n for n in illusion.CHECKS if n in wide.index):
        r = wide.loc[name]
        warn = None if math.isnan(r.warning) else bool(r.warning)
        out.append(
            illusion.Check(
                name,
                r.check_value,
                r.threshold,
                warn,
                "",
                margin=r.margin,
                ci=(r.margin_low, r.margin_high),
                se=r.margin_se,
                value_ci=(r.value_low, r.value_high),
                applies=bool(r.applies),
            )
        )
    return out


def summary_table(checks: list[illusion.Check]) -> pd.DataFrame:
    """The printed table: value, interval, threshold, margin, warning per check; the verdict."""
    table = illusion.verdict_table(checks)
    cols = ["scope", "value", "ci_low", "ci_high", "threshold", "margin", "warning"]
    return table[cols]
