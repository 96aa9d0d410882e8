"""The benchmark's cases as a table: where each sits against the gate, its truth class, the
confusion matrix, the rates with exact (Clopper-Pearson) intervals, the ROC over the MLP cases
that matter, and the hash that freezes the rule and the planted construction.

Works on one run's `cases.csv` or on several runs' merged (columns `model` and `task`).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from mlpim.analysis import illusion
from mlpim.analysis.stats import auc, roc

NAN = float("nan")
VERDICT_ORDER = (*illusion.LABELS, illusion.BORDERLINE)
ABOVE, HOLDS, BELOW = "above", "holds", "below"  # the effect's interval against the gate
CALIBRATION = ("smollm2", "ioi")  # (model name prefix, task): the split the rule was fixed on
PACKAGE = Path(__file__).resolve().parents[1]
FROZEN = (  # the rule and its inputs, and the planted construction: hashed into every summary
    "conf/check/default.yaml",
    "analysis/illusion.py",
    "analysis/checks/*.py",
    "analysis/planted.py",
    "analysis/benchmark.py",
    "analysis/bench_cases.py",
    "analysis/mlp_write.py",  # what an MLP writes through a post-norm: the checks and the edits
)


def rule_hash() -> str:
    """SHA-256 (first 12 hex digits) of the files in `FROZEN`, by relative path and content."""
    h = hashlib.sha256()
    for pattern in FROZEN:
        for path in sorted(PACKAGE.glob(pattern)):
            h.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def split_of(model: str, task: str) -> str:
    """calibration (SmolLM2 × IOI, where the thresholds were fixed) or held-out."""
    cal = model.lower().startswith(CALIBRATION[0]) and task == CALIBRATION[1]
    return "calibration" if cal else "held-out"


def gate_position(low: float, high: float, gate: float) -> str:
    """above: the effect's whole interval lies above the gate; below: under it; else holds."""
    if math.isfinite(low) and low > gate:
        return ABOVE
    if math.isfinite(high) and high < gate:
        return BELOW
    return HOLDS


def truth_class(row) -> str:
    """A confusion-matrix row: truth, kind and (for the language model) the gate position."""
    if row.site == "toy":
        return f"toy {row.truth}"
    where = "residual" if row.site == "resid_post" else row.kind
    return f"{row.truth} ({where}; {row.gate_pos} the gate)"


def scored(table: pd.DataFrame) -> pd.DataFrame:
    """The language model's scored cases (toy cases and refused edits left out)."""
    keep = (table.site != "toy") & ~table.get("refused", pd.Series(False, table.index)).astype(bool)
    return table[keep]


def confusion(table: pd.DataFrame) -> pd.DataFrame:
    """Truth class × verdict counts, borderline verdicts in their own column."""
    table = table[~table.get("refused", pd.Series(False, table.index)).astype(bool)]
    truth = table.apply(truth_class, axis=1)
    out = pd.crosstab(truth, table.verdict).reindex(columns=list(VERDICT_ORDER), fill_value=0)
    out.index.name = "planted"
    return out


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval for k successes in n trials (NaNs for n = 0)."""
    if n == 0:
        return NAN, NAN
    a = (1 - level) / 2
    low = 0.0 if k == 0 else _solve(lambda p: _tail_ge(k, n, p) - a)
    high = 1.0 if k == n else _solve(lambda p: a - _tail_le(k, n, p))
    return low, high


def _log_pmf(i: int, n: int, p: float) -> float:
    logc = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
    return logc + i * math.log(p) + (n - i) * math.log1p(-p)


def _tail_le(k: int, n: int, p: float) -> float:
    return min(1.0, sum(math.exp(_log_pmf(i, n, p)) for i in range(k + 1)))


def _tail_ge(k: int, n: int, p: float) -> float:
    return min(1.0, sum(math.exp(_log_pmf(i, n, p)) for i in range(k, n + 1)))


def _solve(f) -> float:
    """The root in (0, 1) of an increasing f, by bisection."""
    lo, hi = 1e-12, 1 - 1e-12
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def rate(flagged: pd.Series) -> dict[str, float]:
    """k, n, the rate and its Clopper-Pearson 95% interval."""
    k, n = int(flagged.sum()), int(len(flagged))
    low, high = clopper_pearson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else NAN, "low": low, "high": high}


def dims(table: pd.DataFrame) -> pd.Series:
    """Each case's dimension k (1 where the table has no column k)."""
    return table.get("k", pd.Series(1, table.index)).fillna(1).astype(int)


def mlp_above(table: pd.DataFrame, k_dim: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(illusions, real MLP directions) whose effect interval lies above the gate: directions,
    or with `k_dim` the planted k-dim subspaces (reported beside, never pooled with them)."""
    lm = scored(table)
    lm = lm[(dims(lm) > 1) == k_dim]
    above = lm[(lm.site == "mlp_post") & (lm.gate_pos == ABOVE)]
    return above[above.truth == "illusory"], above[above.truth == "real"]


def rates(table: pd.DataFrame, k_dim: bool = False) -> dict[str, dict[str, float]]:
    """Detection and false-positive rates (above the gate, MLP sites) and the AUC there."""
    ill, real = mlp_above(table, k_dim)
    likely = illusion.LIKELY_ILLUSORY
    lm = scored(table)
    by_m = ill[ill.get("principle", pd.Series("illusory", ill.index)) == "illusory"]
    return {
        "detection": rate(ill.label == likely),
        "detection_m": rate(by_m.label == likely),  # those whose m > 2 (the truth principle)
        "false_positive": rate(real.label == likely),
        "residual_false_positive": rate(lm[lm.site == "resid_post"].label == likely),
        "auc": {"value": auc(ill.score.to_numpy(), real.score.to_numpy())},
    }


def groups(table: pd.DataFrame) -> list[tuple[str, str, str, pd.DataFrame]]:
    """(model, task, split, cases) per model × task, then per model its held-out tasks pooled
    where it has several (the calibration split, SmolLM2 × IOI, is never pooled)."""
    table = table.assign(
        split=[split_of(m, t) for m, t in zip(table.model, table.task, strict=True)]
    )
    out = [(m, t, s, g) for (m, t, s), g in table.groupby(["model", "task", "split"])]
    held = table[table.split == "held-out"]
    return out + [
        (m, "pooled", "held-out", g) for m, g in held.groupby("model") if g.task.nunique() > 1
    ]


def rates_table(table: pd.DataFrame, k_dim: bool = False) -> pd.DataFrame:
    """One row per model × task, and per model the held-out tasks pooled: the rates and their
    exact intervals (the calibration split, SmolLM2 × IOI, is never pooled with held-out ones);
    directions, or with `k_dim` the planted k-dim subspaces."""
    return pd.DataFrame([rates_row(m, t, s, g, k_dim) for m, t, s, g in groups(table)])


def rates_row(model: str, task: str, split: str, g: pd.DataFrame, k_dim: bool = False) -> dict:
    """The rates of one group of cases as one flat row."""
    r = rates(g, k_dim)
    row = {"model": model, "task": task, "split": split}
    for key in ("detection", "detection_m", "false_positive"):
        x = r[key]
        row |= {f"{key}_k": x["k"], f"{key}_n": x["n"], key: x["rate"]}
        row |= {f"{key}_low": x["low"], f"{key}_high": x["high"]}
    return row | {"auc": r["auc"]["value"]}


def coverage(table: pd.DataFrame) -> pd.DataFrame:
    """Per model × task, and per model the held-out tasks pooled: the 1-D MLP cases above the
    gate, the illusions among them within twice the gate, the real ones that are hard negatives."""
    return pd.DataFrame([coverage_row(m, t, s, g) for m, t, s, g in groups(table)])


def coverage_row(model: str, task: str, split: str, g: pd.DataFrame) -> dict:
    """One group's coverage: its counts above the gate, and those near it or hard among them."""
    ill, real = mlp_above(g)
    near = int((ill.fldd <= 2 * ill.gate).sum())
    hard = int((real.kind == "hard negative").sum())
    where = {"model": model, "task": task, "split": split}
    return where | {"illusions": len(ill), "near_gate": near, "real": len(real), "hard": hard}


def roc_curve(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the illusion score over the MLP cases above the gate."""
    ill, real = mlp_above(table)
    return roc(ill.score.to_numpy(), real.score.to_numpy())


def misses(table: pd.DataFrame) -> pd.DataFrame:
    """Scored MLP cases above the gate whose label disagrees with their truth, with the reason."""
    likely, wrong = illusion.LIKELY_ILLUSORY, []
    for k_dim in (False, True):
        ill, real = mlp_above(table, k_dim)
        wrong += [ill[ill.label != likely], real[real.label == likely]]
    wrong = pd.concat(wrong)
    cols = ["model", "task", "seed", "case", "layer", "kind", "k", "fldd", "m", "label", "reason"]
    return wrong[[c for c in cols if c in wrong.columns]]
