"""Dormant: the patched MLP output, read along W_out·v, lies where natural outputs never go."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlpim.analysis.checks.base import Check, Spec, Threshold, as_est, judged, register
from mlpim.analysis.references import Refs
from mlpim.analysis.stats import Est, fixed

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds


def off_distribution_check(
    off: Est | float, full_off: float, refs: Refs, th: Thresholds, k: int = 1
) -> Check:
    """EMD of the patched read-out from the natural one ≥ th.off_distribution natural sd (k > 1:
    the sliced EMD inside the span W_out·V writes)."""
    o = as_est(off)
    what = "EMD(patched, natural) along W_out·v" if k == 1 else "sliced EMD in the span of W_out·V"
    return judged(
        "off_distribution",
        o,
        fixed(th.off_distribution),
        1,
        True,
        th,
        f"EMD ≥ {th.off_distribution} natural sd",
        f"{what}: {o.value:.3g} sd (full-site patch {full_off:.3g})",
        refs.natural_off,
        inclusive=True,
    )


SPEC = register(
    Spec(
        name="off_distribution",
        order=50,
        scope="direction",
        half="dormant",
        meaning="patched MLP output lies where real prompts never go",
        judge=off_distribution_check,
        thresholds=(
            Threshold(
                "off_distribution",
                "warns when the patched MLP output, read along W_out·v, is ≥ this many natural "
                "sd (earth-mover distance) from the natural outputs",
            ),
        ),
        on_value_scale=True,
    )
)
