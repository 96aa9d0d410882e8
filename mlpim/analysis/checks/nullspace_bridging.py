"""Bridging: the effect needs v's W_out-nullspace part, which alone does nothing (MLP hidden sites).

FLDD(v) is superadditive over its row-space and nullspace parts. `bridging_margin` is the one
place the margin is written; the natural directions' reference and the toy cases use it too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from mlpim.analysis.checks.base import Check, Spec, Threshold, as_est, judged, register
from mlpim.analysis.references import Refs
from mlpim.analysis.stats import Est, combine

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds


def bridging_bar(fldd_row, fldd_null, superadditive: float):
    """superadditive · (FLDD(row)⁺ + FLDD(null)⁺): what FLDD(v) must exceed to warn."""
    return superadditive * (np.maximum(fldd_row, 0.0) + np.maximum(fldd_null, 0.0))


def bridging_margin(
    fldd_v: float, fldd_row: float, fldd_null: float, superadditive: float
) -> float:
    """FLDD(v) − superadditive · (FLDD(row)⁺ + FLDD(null)⁺): positive when v bridges."""
    return float(fldd_v - bridging_bar(fldd_row, fldd_null, superadditive))


def nullspace_check(
    fldd_v: Est | float,
    fldd_row: Est | float,
    fldd_null: Est | float,
    null_norm_sq: float,
    refs: Refs,
    th: Thresholds,
) -> Check:
    """Bridging: ‖null‖² ≥ null_norm_sq and FLDD(v) > superadditive·(FLDD(row)⁺ + FLDD(null)⁺)."""
    v, r, n = as_est(fldd_v), as_est(fldd_row), as_est(fldd_null)
    t = combine(lambda a, b: bridging_bar(a, b, th.superadditive), r, n)
    rule = f"FLDD(v) > {th.superadditive}·(FLDD(row)⁺ + FLDD(null)⁺), ‖null‖² ≥ {th.null_norm_sq}"
    detail = (
        f"‖null‖² {null_norm_sq:.3f}; FLDD v {v.value:.3f}, row {r.value:.3f}, null {n.value:.3f}"
    )
    c = judged(
        "nullspace_bridging",
        v,
        t,
        1,
        null_norm_sq >= th.null_norm_sq,
        th,
        rule,
        detail,
        refs.natural_bridging,
    )
    return replace(c, placed=c.margin)


SPEC = register(
    Spec(
        name="nullspace_bridging",
        order=30,
        scope="direction",
        half="bridging",
        meaning="the effect needs v's unread (W_out-nullspace) part",
        judge=nullspace_check,
        thresholds=(
            Threshold("null_norm_sq", "applies only when ‖null part‖² of the unit v ≥ this"),
            Threshold("superadditive", "warns when FLDD(v) > this × (FLDD(row)⁺ + FLDD(null)⁺)"),
        ),
    )
)
