"""Site: DAS on norm-matched random MLPs reaches as much as v does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlpim.analysis.checks.base import Check, Spec, Threshold, as_est, judged, register
from mlpim.analysis.references import Refs
from mlpim.analysis.stats import Est, combine

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds


def random_mlp_check(
    fldd_random: Est | float, fldd_v: Est | float, refs: Refs, th: Thresholds
) -> Check:
    """Site: mean FLDD of random-MLP DAS ≥ random_fraction · FLDD(v)."""
    rand, v = as_est(fldd_random), as_est(fldd_v)
    t = combine(lambda x: th.random_fraction * x, v)
    return judged(
        "random_mlp",
        rand,
        t,
        1,
        True,
        th,
        f"FLDD(random) ≥ {th.random_fraction}·FLDD(v)",
        f"FLDD(random MLP) {rand.value:.3f} ({refs.random_mlp.name}), FLDD(v) {v.value:.3f}",
        refs.random_mlp,
        v.value,
        inclusive=True,
    )


SPEC = register(
    Spec(
        name="random_mlp",
        order=70,
        scope="site",
        meaning="site: DAS on random MLPs reaches a similar effect",
        judge=random_mlp_check,
        thresholds=(
            Threshold("random_fraction", "warns when DAS on random MLPs reaches ≥ this × FLDD(v)"),
        ),
        on_value_scale=True,
    )
)
