"""The verdict on a 1-D subspace v: the MLP-in-the-middle illusion's warning signs combined.

Each check is one module of `mlpim.analysis.checks` (its judging function and its registry
entry); this module combines them. The rule, with its reasons: docs/verdict-rule.md.

The effect gate: FLDD(v) must exceed max(check.min_effect, a quantile of random directions').
Below it the verdict is "no effect to explain". The direction checks decide the verdict: it is
likely illusory when a bridging check warns and a dormant one does too, caution when any direction
check warns. Site checks describe the site and never decide; info checks never warn.

Every warning is decided on the value; it is *borderline* when the bootstrap interval of its margin
(`check.ci_level`) contains the threshold, on either side, and the gate likewise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlpim.analysis.checks import BRIDGING, CHECKS, DIRECTION, DORMANT
from mlpim.analysis.checks.base import CHECK_METRICS, NA, Check
from mlpim.analysis.rows import metric_rows

NO_EFFECT = "no effect to explain"
NO_WARNING = "no warning signs"
CAUTION = "caution"
LIKELY_ILLUSORY = "likely illusory"
LABELS = (NO_EFFECT, NO_WARNING, CAUTION, LIKELY_ILLUSORY)  # in order of suspicion
BORDERLINE = "borderline"
NAN = float("nan")
Z_CAP = 50.0  # |margin / bootstrap sd| is capped here in the illusion score
HALF_MEANS = {  # what each half of the illusion is, in the rule's words
    "bridging": "the effect exceeds its read part's own, so it needs the unread part",
    "dormant": "the patch drives the read part where real prompts never go",
}


def _either(names: Sequence[str]) -> str:
    return " or ".join(names)


def rule_sentence() -> str:
    """The verdict rule in words, from the registry's halves and direction checks."""
    halves = (*BRIDGING, *DORMANT)
    others = [n for n in DIRECTION if n not in halves]
    return (
        f"likely illusory when {HALF_MEANS['bridging']} ({_either(BRIDGING)}) AND "
        f"{HALF_MEANS['dormant']} ({_either(DORMANT)}); caution when one of these or "
        f"{_either(others)} warns; a warning whose interval holds its threshold is borderline."
    )


@dataclass(frozen=True)
class Gate:
    """Whether FLDD(v) is an effect worth explaining, and whether that is a close call."""

    ok: bool
    borderline: bool
    threshold: float
    value: float = NAN


def gate_of(checks: Sequence[Check]) -> Gate:
    """The gate from the effect row (an absent row passes)."""
    e = next((c for c in checks if c.name == "effect"), None)
    if e is None:
        return Gate(True, False, NAN)
    lo, hi = e.ci
    close = math.isfinite(lo) and lo <= 0.0 <= hi
    return Gate(e.margin >= 0, close, e.threshold, e.value)


@dataclass(frozen=True)
class Verdict:
    """The label, its two ends when borderline checks could change it, what fired; the checks."""

    label: str
    low: str
    high: str
    warned: tuple[str, ...]  # direction checks that warn (firm or borderline)
    site_notes: tuple[str, ...]  # site checks that warn
    gate: Gate
    checks: tuple[Check, ...]
    score: float  # `illusion_score` of the checks

    @property
    def n_warnings(self) -> int:
        """How many checks warn."""
        return len(self.warned)

    @property
    def klass(self) -> str:
        """The label with every borderline verdict pooled as "borderline"."""
        return BORDERLINE if self.low != self.high else self.low

    def to_rows(self, keys: dict) -> list[dict]:
        """Each check's tidy rows, then the verdict's (n_warnings, score)."""
        rows = [r for c in self.checks for r in c.to_rows(keys)]
        values = {"n_warnings": float(self.n_warnings), "score": self.score}
        return rows + metric_rows(values, intervention="verdict", split="test", **keys)

    @classmethod
    def from_rows(cls, df: pd.DataFrame) -> Verdict:
        """The verdict of a metrics table's check rows (`to_rows`), checks in `CHECKS` order."""
        wide = df[df.metric.isin(CHECK_METRICS)].pivot_table(
            index="intervention", columns="metric", values="value", dropna=False
        )
        return verdict([Check.from_rows(n, wide.loc[n]) for n in CHECKS if n in wide.index])


def label_of(gate_ok: bool, warned: set[str]) -> str:
    """The rule's label for a gate and a set of warning direction checks (docs/verdict-rule.md)."""
    if not gate_ok:
        return NO_EFFECT
    if warned & set(BRIDGING) and warned & set(DORMANT):
        return LIKELY_ILLUSORY
    return CAUTION if warned & set(DIRECTION) else NO_WARNING


def verdict(checks: Sequence[Check]) -> Verdict:
    """The verdict from the gate and the direction checks, borderline ends included."""
    gate = gate_of(checks)
    direction = [c for c in checks if c.scope == "direction" and c.warning is not None]
    firm = {c.name for c in direction if c.warning and not c.borderline}
    maybe = firm | {c.name for c in direction if c.borderline}
    low = label_of(gate.ok and not gate.borderline, firm)
    high = label_of(gate.ok or gate.borderline, maybe)
    label = low if low == high else f"{BORDERLINE}: {low} or {high}"
    if label == NO_EFFECT:
        label = f"{NO_EFFECT} (FLDD {gate.value:.3f} below the gate {gate.threshold:.3f})"
    warned = tuple(c.name for c in direction if c.warning)
    notes = tuple(c.name for c in checks if c.scope == "site" and c.warning)
    score = illusion_score(checks)
    return Verdict(label, low, high, warned, notes, gate, tuple(checks), score)


def _z(c: Check | None) -> float:
    """margin / bootstrap sd, capped at ±Z_CAP; −Z_CAP for a check that does not apply."""
    if c is None or c.warning is None or not c.applies or math.isnan(c.margin):
        return -Z_CAP
    if math.isinf(c.margin):
        return math.copysign(Z_CAP, c.margin)
    se = c.se if math.isfinite(c.se) and c.se > 0 else abs(c.margin) or 1.0
    return float(np.clip(c.margin / se, -Z_CAP, Z_CAP))


def illusion_score(checks: Sequence[Check]) -> float:
    """min(z of bridging, max(z of dormant, z of off-distribution)); z = margin / bootstrap sd."""
    by = {c.name: c for c in checks}
    bridge = max(_z(by.get(n)) for n in BRIDGING)
    dormant = max(_z(by.get(n)) for n in DORMANT)
    return min(bridge, dormant)


def warning_word(check: Check) -> str:
    """yes / no (", borderline"), n.a. for a check without a value, info for one never warning."""
    if check.warning is None:
        return NA if check.value != check.value else "info"  # NaN: not measured
    word = "yes" if check.warning else "no"
    return f"{word}, {BORDERLINE}" if check.borderline else word


def verdict_table(v: Verdict | Sequence[Check]) -> pd.DataFrame:
    """One row per check (scope, value, intervals, threshold, margin, warning) and the verdict."""
    v = v if isinstance(v, Verdict) else verdict(v)
    rows = [
        {
            "check": c.name,
            "scope": c.scope,
            "value": c.value,
            "ci_low": c.value_ci[0],
            "ci_high": c.value_ci[1],
            "threshold": c.threshold,
            "margin": c.margin,
            "margin_low": c.ci[0],
            "margin_high": c.ci[1],
            "reference": c.reference.name if c.reference else "",
            "percentile": c.percentile,
            "z": c.z,
            "warning": warning_word(c),
            "meaning": c.meaning,
        }
        for c in v.checks
    ]
    rows.append(
        {
            "check": "verdict",
            "value": float(v.n_warnings),
            "warning": v.label,
            "meaning": "decided by the direction checks (docs/verdict-rule.md)",
        }
    )
    return pd.DataFrame(rows).set_index("check")
