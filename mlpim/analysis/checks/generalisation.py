"""Generalisation: the effect on held-out pairs falls below a fraction of the train effect."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from mlpim.analysis.checks.base import NAN, Check, Spec, Threshold, as_est, judged, register
from mlpim.analysis.stats import Est, combine, fixed

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds


def generalisation_check(
    fldd_train: Est | float, fldd_held: Est | float | Mapping[str, Est | float], th: Thresholds
) -> Check:
    """Lowest FLDD(held-out set) / FLDD(changing train pairs) < th.generalisation."""
    held = fldd_held if isinstance(fldd_held, Mapping) else {"held out": fldd_held}
    held = {k: as_est(v) for k, v in held.items()}
    train = as_est(fldd_train)
    worst = min(held, key=lambda k: held[k].value)
    ok = abs(train.value) > 1e-9
    lowest = lambda t, *h: np.minimum.reduce(h) / t  # noqa: E731
    ratio = combine(lowest, train, *held.values()) if ok else fixed(NAN)
    sets = ", ".join(f"{k} {v.value:.3f}" for k, v in held.items())
    detail = (
        f"FLDD on opposite-pattern train pairs {train.value:.3f}; held out: {sets} "
        f"(lowest: {worst})"
    )
    return judged(
        "generalisation",
        ratio,
        fixed(th.generalisation),
        -1,
        ok,
        th,
        f"FLDD(held out) < {th.generalisation}·FLDD(train)",
        detail,
    )


SPEC = register(
    Spec(
        name="generalisation",
        order=80,
        scope="direction",
        meaning="held-out effect below a fraction of the train effect",
        judge=generalisation_check,
        thresholds=(
            Threshold(
                "generalisation",
                "warns when FLDD(held out) < this × FLDD(opposite-pattern train pairs)",
            ),
        ),
    )
)
