"""Dormant: the patched MLP output, read along what v writes into the residual, lies farther from
the natural outputs than the whole-site patch's own output does.

The value is net of the whole-site patch: distance(v) − distance(whole-site patch), both measured
on the same pairs against the same natural sample, with a paired bootstrap. A whole-site patch
puts in a real prompt's activation, so its distance is what pairs of these prompts give anyway
(the test prompts' own distance from the natural sample, and sampling noise). `net_off` is the
one place the difference is written; the natural directions' reference uses it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlpim.analysis.checks.base import Check, Spec, Threshold, as_est, judged, register
from mlpim.analysis.references import Refs
from mlpim.analysis.stats import Est, combine, fixed

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds


def net_off(off: Est | float, full_off: Est | float) -> Est:
    """distance(v) − distance(whole-site patch), replicate by replicate."""
    return combine(lambda a, b: a - b, as_est(off), as_est(full_off))


def off_distribution_check(
    off: Est | float, full_off: Est | float, refs: Refs, th: Thresholds, k: int = 1
) -> Check:
    """EMD of the patched read-out from the natural one, net of the whole-site patch's EMD,
    ≥ th.off_distribution natural sd (k > 1: the sliced EMD inside the span V writes)."""
    o, f = as_est(off), as_est(full_off)
    net = net_off(o, f)
    what = "EMD(patched, natural) along v's write" if k == 1 else "sliced EMD in the span V writes"
    return judged(
        "off_distribution",
        net,
        fixed(th.off_distribution),
        1,
        True,
        th,
        f"EMD − EMD(whole-site patch) ≥ {th.off_distribution} natural sd",
        f"{what}: {o.value:.3g} sd − whole-site patch {f.value:.3g} = {net.value:.3g}",
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
                "warns when the patched MLP output, read along what v writes into the residual, "
                "is ≥ this many natural sd (earth-mover distance) farther from the natural "
                "outputs than the whole-site patch's",
            ),
        ),
        on_value_scale=True,
    )
)
