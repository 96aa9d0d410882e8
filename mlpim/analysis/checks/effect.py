"""The gate: FLDD(v) must exceed max(min_effect, a quantile of random unit directions' FLDD)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from mlpim.analysis.checks.base import Check, Spec, Threshold, as_est, judged, register
from mlpim.analysis.references import Refs
from mlpim.analysis.stats import Est, fixed

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds


def gate_threshold(refs: Refs, th: Thresholds) -> float:
    """max(min_effect, the random directions' effect_quantile)."""
    q = refs.random_dirs.quantile(th.effect_quantile)
    return max(th.min_effect, q) if math.isfinite(q) else th.min_effect


def effect_check(fldd_v: Est | float, refs: Refs, th: Thresholds) -> Check:
    """The gate's row: FLDD(v) against max(min_effect, random directions' quantile)."""
    fldd_v, t = as_est(fldd_v), gate_threshold(refs, th)
    c = judged(
        "effect",
        fldd_v,
        fixed(t),
        1,
        True,
        th,
        f"FLDD(v) ≥ {t:.3g} (the gate)",
        f"FLDD(v) {fldd_v.value:.3f}; effect worth explaining from {t:.3f}",
        refs.random_dirs,
    )
    return replace(c, warning=None)


SPEC = register(
    Spec(
        name="effect",
        order=10,
        scope="info",
        meaning="gate: FLDD(v) vs min_effect and random directions",
        judge=effect_check,
        thresholds=(
            Threshold("min_effect", "FLDD(v) below this is no effect to explain"),
            Threshold(
                "effect_quantile", "FLDD(v) must exceed this quantile of random directions' FLDD"
            ),
        ),
        on_value_scale=True,
    )
)
