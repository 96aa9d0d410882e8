"""Bridging: the effect is larger than its read part's own effect, so it needs the unread part.

At an MLP hidden site a patch along v's W_out-nullspace part alone changes nothing downstream
(W_out does not read it): FLDD(null part) is 0 by construction, and a bar written as
FLDD(row)⁺ + FLDD(null)⁺ would only add that 0. So the rule compares FLDD(v) with its row-space
(read) part's own effect: FLDD(v) > superadditive · FLDD(row part)⁺, when the unread part is
large enough (‖null part‖² ≥ null_norm_sq) to be what makes the difference. The null part's FLDD
is still measured and reported (a metric row), as the check that it is 0. `bridging_margin` is
the one place the margin is written; the natural directions' reference and the toy cases use it.
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


def bridging_bar(fldd_row, superadditive: float):
    """superadditive · FLDD(row)⁺: what FLDD(v) must exceed to warn."""
    return superadditive * np.maximum(fldd_row, 0.0)


def bridging_margin(fldd_v: float, fldd_row: float, superadditive: float) -> float:
    """FLDD(v) − superadditive · FLDD(row)⁺: positive when v does more than its read part."""
    return float(fldd_v - bridging_bar(fldd_row, superadditive))


def nullspace_check(
    fldd_v: Est | float,
    fldd_row: Est | float,
    null_norm_sq: float,
    refs: Refs,
    th: Thresholds,
) -> Check:
    """Bridging: ‖null‖² ≥ null_norm_sq and FLDD(v) > superadditive · FLDD(row)⁺."""
    v, r = as_est(fldd_v), as_est(fldd_row)
    t = combine(lambda a: bridging_bar(a, th.superadditive), r)
    rule = f"FLDD(v) > {th.superadditive}·FLDD(row part)⁺, ‖null part‖² ≥ {th.null_norm_sq}"
    detail = f"‖null‖² {null_norm_sq:.3f}; FLDD v {v.value:.3f}, row part {r.value:.3f}"
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
        meaning="effect exceeds its read part's: needs the unread part",
        judge=nullspace_check,
        thresholds=(
            Threshold("null_norm_sq", "applies only when ‖null part‖² of the unit v ≥ this"),
            Threshold("superadditive", "warns when FLDD(v) > this × FLDD(row part)⁺"),
        ),
    )
)
