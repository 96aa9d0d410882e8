"""Warning signs of the MLP-in-the-middle illusion for a 1-D subspace v: pure checks and a verdict.

Every check takes numbers (FLDDs of patches, cosines) or tensors (site activations, W_out, v) and
returns a `Check`; nothing here runs a model. The runner (`mlpim.experiments.illusion_check`) measures
the numbers on IOI pairs; the tests measure them on a hand-built model.

1. component vs subspace: the direction moves the answer, patching the whole site does not.
2. nullspace bridging (MLP hidden sites): v needs both its W_out row-space and nullspace parts.
3. dormant row part (MLP hidden sites): the patch drives v's row-space direction far further than
   real prompts ever differ along it.
4. alignment (information only): |cos(W_out·v, v_ref)| against random hidden directions.
5. random-MLP baseline: DAS on a norm-matched random MLP reaches a similar effect.

Checks 1, 2 and 5 only warn when v has an effect worth explaining, FLDD(v) ≥ `MIN_EFFECT`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import nullspace as ns

MIN_EFFECT = 0.2  # FLDD(v) below which there is no effect to explain (checks 1, 2, 5)
COMPONENT_FRACTION = 0.5  # check 1: whole-site FLDD below this fraction of FLDD(v)
NULL_NORM_SQ = 0.1  # check 2: ‖null_proj‖² of the unit v at least this
SUPERADDITIVE = 1.5  # check 2: FLDD(v) above this times FLDD(row) + max(FLDD(null), 0)
DORMANT_RATIO = 2.0  # check 3
RANDOM_FRACTION = 0.5  # check 5: random-MLP FLDD at least this fraction of FLDD(v)
VERDICTS = {0: "no warning signs", 1: "caution"}  # 2 or more: LIKELY_ILLUSORY
LIKELY_ILLUSORY = "likely illusory"
NA = "n.a."

MEANINGS = {  # one line each, short enough for the printed table
    "component_vs_subspace": "v moves the answer, the whole site does not",
    "nullspace_bridging": "effect needs both the read and unread parts of v",
    "dormant_row_part": "patch drives a direction real prompts never move",
    "alignment": "info: cos(W_out v, v_ref) vs random directions",
    "random_mlp": "a random MLP reaches a similar effect",
}
CHECKS = tuple(MEANINGS)


@dataclass(frozen=True)
class Check:
    """One row of the verdict table; `warning` is None when the check is n.a. or information."""

    name: str
    value: float
    threshold: float
    warning: bool | None
    rule: str  # when it warns, in words
    detail: str = ""  # the numbers behind it

    @property
    def meaning(self) -> str:
        return MEANINGS[self.name]


def not_applicable(name: str, why: str) -> Check:
    """A check that does not apply to this site or was not asked for."""
    return Check(name, float("nan"), float("nan"), None, NA, why)


def component_check(fldd_v: float, fldd_full: float) -> Check:
    """Warn when FLDD(v) ≥ MIN_EFFECT and FLDD(whole site) < COMPONENT_FRACTION · FLDD(v)."""
    threshold = COMPONENT_FRACTION * fldd_v
    warn = fldd_v >= MIN_EFFECT and fldd_full < threshold
    rule = f"FLDD(full) < {COMPONENT_FRACTION}·FLDD(v), FLDD(v) ≥ {MIN_EFFECT}"
    detail = f"FLDD(v) {fldd_v:.3f}, FLDD(full) {fldd_full:.3f}"
    return Check("component_vs_subspace", fldd_full, threshold, warn, rule, detail)


def nullspace_check(fldd_v: float, fldd_row: float, fldd_null: float, null_norm_sq: float) -> Check:
    """Warn when ‖null‖² ≥ NULL_NORM_SQ, FLDD(v) ≥ MIN_EFFECT and FLDD(v) is superadditive:
    FLDD(v) > SUPERADDITIVE · (FLDD(row) + max(FLDD(null), 0))."""
    threshold = SUPERADDITIVE * (fldd_row + max(fldd_null, 0.0))
    warn = null_norm_sq >= NULL_NORM_SQ and fldd_v >= MIN_EFFECT and fldd_v > threshold
    rule = f"FLDD(v) > {SUPERADDITIVE}·(FLDD(row) + FLDD(null)⁺), ‖null‖² ≥ {NULL_NORM_SQ}"
    detail = (
        f"‖null‖² {null_norm_sq:.3f}; FLDD v {fldd_v:.3f}, row {fldd_row:.3f}, null {fldd_null:.3f}"
    )
    return Check("nullspace_bridging", fldd_v, threshold, warn, rule, detail)


def dormant_ratio(
    base: Float[Tensor, "n m"], source: Float[Tensor, "n m"], v: Float[Tensor, " m"],
    row: Float[Tensor, " m"],
) -> float:  # fmt: skip
    """mean |((s−b)·v)(v·r)| / mean |(s−b)·r| for r = row/‖row‖ (unit v).

    The numerator is how far the patch along v moves the activation along r, the denominator how
    far source and base prompts differ along r; inf when they never differ along r. 0 when v has
    no row-space part.
    """
    if row.norm() < 1e-6:
        return 0.0
    r = (row / row.norm()).double()
    diff = (source - base).double()
    pushed = ((diff @ v.double()) * (v.double() @ r)).abs().mean()
    natural = (diff @ r).abs().mean()
    if natural <= 1e-9 * max(pushed.item(), 1.0):
        return float("inf") if pushed > 1e-9 else 0.0
    return (pushed / natural).item()


def dormant_check(ratio: float) -> Check:
    """Warn when the dormant ratio is at least DORMANT_RATIO (a real direction gives about 1)."""
    rule = f"ratio ≥ {DORMANT_RATIO}"
    detail = f"patch vs natural movement along the row-space direction: {ratio:.3g}"
    return Check("dormant_row_part", ratio, DORMANT_RATIO, ratio >= DORMANT_RATIO, rule, detail)


def alignment_check(
    v: Float[Tensor, " m"], w_out: Float[Tensor, "m d"], v_ref: Float[Tensor, " d"],
    n_random: int, seed: int,
) -> Check:  # fmt: skip
    """|cos(W_out·v, v_ref)| with the 95th percentile of the same for random unit hidden
    directions as the threshold; information only (never a warning)."""
    cos = abs(ns.cosine(v @ w_out, v_ref))
    gen = torch.Generator().manual_seed(seed)
    q95 = ns.random_output_cosines(w_out, v_ref, n_random, gen).abs().quantile(0.95).item()
    return Check("alignment", cos, q95, None, "never (information only)",
                 f"|cos| {cos:.3f}, random q95 {q95:.3f} (n={n_random})")  # fmt: skip


def random_mlp_check(fldd_random: float, fldd_v: float) -> Check:
    """Warn when FLDD(v) ≥ MIN_EFFECT and the random MLP's FLDD ≥ RANDOM_FRACTION · FLDD(v)."""
    threshold = RANDOM_FRACTION * fldd_v
    warn = fldd_v >= MIN_EFFECT and fldd_random >= threshold
    rule = f"FLDD(random) ≥ {RANDOM_FRACTION}·FLDD(v), FLDD(v) ≥ {MIN_EFFECT}"
    detail = f"FLDD(random MLP) {fldd_random:.3f}, FLDD(v) {fldd_v:.3f}"
    return Check("random_mlp", fldd_random, threshold, warn, rule, detail)


def mlp_checks(
    fldd: Mapping[str, float], v: Float[Tensor, " m"], w_out: Float[Tensor, "m d"],
    base: Float[Tensor, "n m"], source: Float[Tensor, "n m"],
) -> list[Check]:  # fmt: skip
    """Checks 1-3 at an MLP hidden site: `fldd` holds das, full, row_proj and null_proj (a part
    missing because v has none of it counts as 0), v is a unit vector."""
    proj, null = ns.split(v, w_out)
    row, nul = fldd.get("row_proj", 0.0), fldd.get("null_proj", 0.0)
    return [
        component_check(fldd["das"], fldd["full"]),
        nullspace_check(fldd["das"], row, nul, null.norm().item() ** 2),
        dormant_check(dormant_ratio(base, source, v, proj)),
    ]


def verdict(checks: Sequence[Check]) -> tuple[int, str]:
    """(number of warnings, label): 0 no warning signs, 1 caution, ≥2 likely illusory."""
    n = sum(c.warning is True for c in checks)
    return n, VERDICTS.get(n, LIKELY_ILLUSORY)


def warning_word(check: Check) -> str:
    """yes / no; n.a. for a check without a value, info for one that never warns."""
    if check.warning is None:
        return NA if check.value != check.value else "info"  # NaN: not measured
    return "yes" if check.warning else "no"


def verdict_table(checks: Sequence[Check]) -> pd.DataFrame:
    """One row per check (value, threshold, warning yes/no/n.a., meaning) and a verdict row."""
    rows = [{"check": c.name, "value": c.value, "threshold": c.threshold,
             "warning": warning_word(c), "meaning": c.meaning} for c in checks]  # fmt: skip
    n, label = verdict(checks)
    rows.append({"check": "verdict", "value": float(n), "threshold": float("nan"),
                 "warning": label, "meaning": "warnings: 0 none, 1 caution, 2+ likely illusory"})  # fmt: skip
    return pd.DataFrame(rows).set_index("check")
