"""Site: the whole-site patch does not carry the effect that patching v has."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlpim.analysis.checks.base import Check, Spec, Threshold, as_est, judged, register
from mlpim.analysis.stats import Est, combine

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds


def component_check(fldd_v: Est | float, fldd_full: Est | float, th: Thresholds) -> Check:
    """Site: FLDD(whole site) < component_fraction · FLDD(v)."""
    v, f = as_est(fldd_v), as_est(fldd_full)
    t = combine(lambda x: th.component_fraction * x, v)
    return judged(
        "component_vs_subspace",
        f,
        t,
        -1,
        True,
        th,
        f"FLDD(full) < {th.component_fraction}·FLDD(v)",
        f"FLDD(v) {v.value:.3f}, FLDD(full) {f.value:.3f}",
    )


SPEC = register(
    Spec(
        name="component_vs_subspace",
        order=20,
        scope="site",
        meaning="site: the whole site does not carry the effect",
        judge=component_check,
        thresholds=(
            Threshold("component_fraction", "warns when FLDD(whole site) < this × FLDD(v)"),
        ),
    )
)
