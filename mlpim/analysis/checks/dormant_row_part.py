"""Dormant: the patch drives v's row-space direction further than real prompts differ along it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlpim.analysis.checks.base import Check, Spec, Threshold, as_est, judged, register
from mlpim.analysis.references import Refs
from mlpim.analysis.stats import Est, fixed

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds


def dormant_check(ratio: Est | float, refs: Refs, th: Thresholds, k: int = 1) -> Check:
    """Dormant ratio ≥ th.dormant_ratio (a real direction gives about 1); k: V's dimension."""
    r = as_est(ratio)
    where = "along the row-space direction" if k == 1 else "inside the row-space part (Mahalanobis)"
    return judged(
        "dormant_row_part",
        r,
        fixed(th.dormant_ratio),
        1,
        True,
        th,
        f"ratio ≥ {th.dormant_ratio}",
        f"patch vs natural movement {where}: {r.value:.3g}",
        refs.natural_dormant,
        inclusive=True,
    )


SPEC = register(
    Spec(
        name="dormant_row_part",
        order=40,
        scope="direction",
        half="dormant",
        meaning="patch drives v's read part beyond natural differences",
        judge=dormant_check,
        thresholds=(
            Threshold(
                "dormant_ratio",
                "warns when the patch moves the row-space direction ≥ this × as far as "
                "prompts differ along it (≈ 1 for a real direction)",
            ),
        ),
        on_value_scale=True,
    )
)
