"""Warning signs of the MLP-in-the-middle illusion for a 1-D subspace v: pure checks and a verdict.

Every check takes numbers (FLDDs of patches, cosines) or tensors (site activations, W_out, v) and
returns a `Check`; nothing here runs a model. The runner (`mlpim.experiments.illusion_check`) measures
the numbers on the task's pairs; the tests measure them on a hand-built model.

0. effect (information): FLDD(v) against random unit directions; the gate of checks 1, 2, 5, 6.
1. component vs subspace: the direction moves the answer, patching the whole site does not.
2. nullspace bridging (MLP hidden sites): v needs both its W_out row-space and nullspace parts.
3. dormant row part (MLP hidden sites): the patch drives v's row-space direction far further than
   real prompts ever differ along it.
4. alignment (information only): |cos(W_out·v, v_ref)| against random hidden directions.
5. random-MLP baseline: DAS on a norm-matched random MLP reaches a similar effect.
6. generalisation: the effect on held-out pairs falls below a fraction of the train effect.

Thresholds are `Thresholds` (config `check.*`). Each check is also placed in a reference
distribution measured on the same model, site and task (`mlpim.analysis.references`): its
percentile and z-score are reported, and a check whose margin from its threshold is smaller than
the reference's spread is *borderline*; a verdict that a borderline check could change says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import nullspace as ns
from mlpim.analysis.references import Reference, Refs, dormant_ratio

__all__ = ["dormant_ratio"]  # re-exported: it lives with the references that use it too

MIN_EFFECT = 0.2  # FLDD(v) below which there is no effect to explain (checks 1, 2, 5, 6)
COMPONENT_FRACTION = 0.5  # check 1: whole-site FLDD below this fraction of FLDD(v)
NULL_NORM_SQ = 0.1  # check 2: ‖null_proj‖² of the unit v at least this
SUPERADDITIVE = 1.5  # check 2: FLDD(v) above this times FLDD(row) + max(FLDD(null), 0)
DORMANT_RATIO = 2.0  # check 3
RANDOM_FRACTION = 0.5  # check 5: random-MLP FLDD at least this fraction of FLDD(v)
GENERALISATION = 0.5  # check 6: held-out FLDD below this fraction of the train FLDD
VERDICTS = {0: "no warning signs", 1: "caution"}  # 2 or more: LIKELY_ILLUSORY
LIKELY_ILLUSORY = "likely illusory"
NO_EFFECT = "no effect to explain"  # FLDD(v) below the effect gate: no verdict on the checks
BORDERLINE = "borderline"
NA = "n.a."
NAN = float("nan")


@dataclass(frozen=True)
class Thresholds:
    """The checks' thresholds (config `check.*`; the defaults are the paper-derived constants)."""

    min_effect: float = MIN_EFFECT
    effect_quantile: float = 0.99  # FLDD(v) must also exceed this quantile of random directions
    component_fraction: float = COMPONENT_FRACTION
    null_norm_sq: float = NULL_NORM_SQ
    superadditive: float = SUPERADDITIVE
    dormant_ratio: float = DORMANT_RATIO
    random_fraction: float = RANDOM_FRACTION
    generalisation: float = GENERALISATION
    borderline_spreads: float = 1.0  # borderline: |margin| < this × the reference's spread


DEFAULT = Thresholds()

MEANINGS = {  # one line each, short enough for the printed table
    "effect": "info: FLDD(v) vs random unit directions",
    "component_vs_subspace": "v moves the answer, the whole site does not",
    "nullspace_bridging": "effect needs both the read and unread parts of v",
    "dormant_row_part": "patch drives a direction real prompts never move",
    "alignment": "info: cos(W_out v, v_ref) vs random directions",
    "random_mlp": "a random MLP reaches a similar effect",
    "generalisation": "held-out effect below a fraction of the train effect",
}
CHECKS = tuple(MEANINGS)


@dataclass(frozen=True)
class Check:
    """One row of the verdict table; `warning` is None when the check is n.a. or information.

    `reference` and `placed`: the distribution the check is judged against and the number placed
    in it (default: the value). `spread`: the noise scale of the margin; `sign` +1 when the check
    warns above its threshold, −1 below; `gate_borderline`: the effect gate itself is borderline.
    """

    name: str
    value: float
    threshold: float
    warning: bool | None
    rule: str  # when it warns, in words
    detail: str = ""  # the numbers behind it
    reference: Reference | None = None
    placed: float | None = None
    spread: float = NAN
    sign: int = 1
    gate_borderline: bool = False

    @property
    def meaning(self) -> str:
        return MEANINGS[self.name]

    @property
    def margin(self) -> float:
        """Signed distance from the threshold, positive on the warning side."""
        return self.sign * (self.value - self.threshold)

    @property
    def percentile(self) -> float:
        ref, x = self.reference, self.value if self.placed is None else self.placed
        return NAN if ref is None else ref.percentile(x)

    @property
    def z(self) -> float:
        ref, x = self.reference, self.value if self.placed is None else self.placed
        return NAN if ref is None else ref.z(x)

    @property
    def borderline(self) -> bool:
        """A warning decision whose margin is within the spread (or whose gate is borderline)."""
        if self.warning is None:
            return False
        close = math.isfinite(self.spread) and abs(self.margin) < self.spread
        return close or (self.gate_borderline and self.warning)


def not_applicable(name: str, why: str) -> Check:
    """A check that does not apply to this site or was not asked for."""
    return Check(name, NAN, NAN, None, NA, why)


@dataclass(frozen=True)
class Gate:
    """Whether FLDD(v) is an effect worth explaining, and whether that is a close call."""

    ok: bool
    borderline: bool
    threshold: float


def effect_gate(fldd_v: float, refs: Refs | None = None, th: Thresholds = DEFAULT) -> Gate:
    """FLDD(v) ≥ max(min_effect, random directions' effect_quantile); borderline within the
    FLDD spread (`th.borderline_spreads` × `Refs.fldd_spread`)."""
    refs = refs or Refs()
    q = refs.random_dirs.quantile(th.effect_quantile)
    threshold = max(th.min_effect, q) if math.isfinite(q) else th.min_effect
    spread = th.borderline_spreads * refs.fldd_spread
    close = math.isfinite(spread) and abs(fldd_v - threshold) < spread
    return Gate(fldd_v >= threshold, close, threshold)


def effect_check(fldd_v: float, refs: Refs | None = None, th: Thresholds = DEFAULT) -> Check:
    """Information row: FLDD(v) against the gate and the random-direction reference."""
    refs, gate = refs or Refs(), effect_gate(fldd_v, refs, th)
    detail = f"FLDD(v) {fldd_v:.3f}; effect worth explaining from {gate.threshold:.3f}" + (
        " (borderline)" if gate.borderline else ""
    )
    return Check("effect", fldd_v, gate.threshold, None, "never (information: the gate of 1, 2, 5, 6)",
                 detail, refs.random_dirs, spread=th.borderline_spreads * refs.fldd_spread)  # fmt: skip


def component_check(
    fldd_v: float, fldd_full: float, refs: Refs | None = None, th: Thresholds = DEFAULT
) -> Check:
    """Warn when FLDD(v) passes the effect gate and FLDD(whole site) < fraction · FLDD(v)."""
    refs, gate = refs or Refs(), effect_gate(fldd_v, refs, th)
    threshold = th.component_fraction * fldd_v
    warn = gate.ok and fldd_full < threshold
    rule = f"FLDD(full) < {th.component_fraction}·FLDD(v), FLDD(v) ≥ {gate.threshold:.3g}"
    detail = f"FLDD(v) {fldd_v:.3f}, FLDD(full) {fldd_full:.3f}"
    return Check("component_vs_subspace", fldd_full, threshold, warn, rule, detail,
                 refs.random_dirs, spread=th.borderline_spreads * refs.fldd_spread, sign=-1,
                 gate_borderline=gate.borderline)  # fmt: skip


def nullspace_check(
    fldd_v: float, fldd_row: float, fldd_null: float, null_norm_sq: float,
    refs: Refs | None = None, th: Thresholds = DEFAULT,
) -> Check:  # fmt: skip
    """Warn when ‖null‖² ≥ null_norm_sq, FLDD(v) passes the gate and FLDD(v) is superadditive:
    FLDD(v) > superadditive · (FLDD(row) + max(FLDD(null), 0)). Its margin is placed among the
    natural directions' margins."""
    refs, gate = refs or Refs(), effect_gate(fldd_v, refs, th)
    threshold = th.superadditive * (fldd_row + max(fldd_null, 0.0))
    warn = null_norm_sq >= th.null_norm_sq and gate.ok and fldd_v > threshold
    rule = f"FLDD(v) > {th.superadditive}·(FLDD(row) + FLDD(null)⁺), ‖null‖² ≥ {th.null_norm_sq}"
    detail = (
        f"‖null‖² {null_norm_sq:.3f}; FLDD v {fldd_v:.3f}, row {fldd_row:.3f}, null {fldd_null:.3f}"
    )
    spread = th.borderline_spreads * refs.fldd_spread if null_norm_sq >= th.null_norm_sq else NAN
    return Check("nullspace_bridging", fldd_v, threshold, warn, rule, detail,
                 refs.natural_bridging, fldd_v - threshold, spread,
                 gate_borderline=gate.borderline and null_norm_sq >= th.null_norm_sq)  # fmt: skip


def dormant_check(ratio: float, refs: Refs | None = None, th: Thresholds = DEFAULT) -> Check:
    """Warn when the dormant ratio is at least th.dormant_ratio (a real direction gives about
    1); placed among the natural directions' ratios, whose spread makes it borderline."""
    refs = refs or Refs()
    rule = f"ratio ≥ {th.dormant_ratio}"
    detail = f"patch vs natural movement along the row-space direction: {ratio:.3g}"
    spread = th.borderline_spreads * refs.natural_dormant.spread
    return Check("dormant_row_part", ratio, th.dormant_ratio, ratio >= th.dormant_ratio, rule,
                 detail, refs.natural_dormant, spread=spread)  # fmt: skip


def alignment_check(
    v: Float[Tensor, " m"], w_out: Float[Tensor, "m d"], v_ref: Float[Tensor, " d"],
    n_random: int, seed: int,
) -> Check:  # fmt: skip
    """|cos(W_out·v, v_ref)| with the 95th percentile of the same for random unit hidden
    directions as the threshold; information only (never a warning)."""
    cos = abs(ns.cosine(ns.written(v, w_out), v_ref))
    gen = torch.Generator().manual_seed(seed)
    rand = ns.random_output_cosines(w_out, v_ref, n_random, gen).abs()
    q95 = rand.quantile(0.95).item()
    ref = Reference(f"random hidden directions (n={n_random})", tuple(rand.tolist()))
    return Check("alignment", cos, q95, None, "never (information only)",
                 f"|cos| {cos:.3f}, random q95 {q95:.3f} (n={n_random})", ref)  # fmt: skip


def random_mlp_check(
    fldd_random: float, fldd_v: float, refs: Refs | None = None, th: Thresholds = DEFAULT
) -> Check:
    """Warn when FLDD(v) passes the gate and the random MLPs' mean FLDD ≥ fraction · FLDD(v);
    FLDD(v) is placed among the random MLPs' FLDDs."""
    refs, gate = refs or Refs(), effect_gate(fldd_v, refs, th)
    threshold = th.random_fraction * fldd_v
    warn = gate.ok and fldd_random >= threshold
    rule = f"FLDD(random) ≥ {th.random_fraction}·FLDD(v), FLDD(v) ≥ {gate.threshold:.3g}"
    detail = f"FLDD(random MLP) {fldd_random:.3f}, FLDD(v) {fldd_v:.3f}"
    spread = th.borderline_spreads * refs.random_mlp.spread
    return Check("random_mlp", fldd_random, threshold, warn, rule, detail, refs.random_mlp,
                 fldd_v, spread, gate_borderline=gate.borderline)  # fmt: skip


def generalisation_check(
    fldd_train: float, fldd_held: float | Mapping[str, float], refs: Refs | None = None,
    th: Thresholds = DEFAULT,
) -> Check:  # fmt: skip
    """Warn when the train effect (opposite-pattern train pairs) passes the gate and the effect
    on a held-out set is below th.generalisation × it. `fldd_held`: one held-out FLDD or one per
    set (e.g. test, new templates, new names); the value is the smallest FLDD(held) / FLDD(train)."""
    held = fldd_held if isinstance(fldd_held, Mapping) else {"held out": fldd_held}
    refs, gate = refs or Refs(), effect_gate(fldd_train, refs, th)
    ok = abs(fldd_train) > 1e-9
    worst = min(held, key=held.get)
    ratio = held[worst] / fldd_train if ok else NAN
    warn = gate.ok and ratio < th.generalisation
    s = th.borderline_spreads * refs.fldd_spread
    spread = s * math.hypot(1.0, ratio) / abs(fldd_train) if math.isfinite(ratio) else NAN
    rule = f"FLDD(held out) < {th.generalisation}·FLDD(train), FLDD(train) ≥ {gate.threshold:.3g}"
    sets = ", ".join(f"{k} {v:.3f}" for k, v in held.items())
    detail = (
        f"FLDD on opposite-pattern train pairs {fldd_train:.3f}; held out: {sets} (lowest: {worst})"
    )
    return Check("generalisation", ratio, th.generalisation, warn, rule, detail, None, None,
                 spread, -1, gate.borderline)  # fmt: skip


def mlp_checks(
    fldd: Mapping[str, float], v: Float[Tensor, " m"], w_out: Float[Tensor, "m d"],
    base: Float[Tensor, "n m"], source: Float[Tensor, "n m"], refs: Refs | None = None,
    th: Thresholds = DEFAULT,
) -> list[Check]:  # fmt: skip
    """Checks 1-3 at an MLP hidden site: `fldd` holds das, full, row_proj and null_proj (a part
    missing because v has none of it counts as 0), v is a unit vector."""
    proj, null = ns.split(v, w_out)
    row, nul = fldd.get("row_proj", 0.0), fldd.get("null_proj", 0.0)
    return [
        component_check(fldd["das"], fldd["full"], refs, th),
        nullspace_check(fldd["das"], row, nul, null.norm().item() ** 2, refs, th),
        dormant_check(dormant_ratio(base, source, v, proj), refs, th),
    ]


def label(n: int) -> str:
    """The verdict's word for n warnings."""
    return VERDICTS.get(n, LIKELY_ILLUSORY)


def verdict_of(
    flags: Sequence[tuple[bool | None, bool]], effect: tuple[float, float] | None = None
) -> tuple[int, str]:
    """`verdict` from (warning, borderline) pairs, one per check; `effect` (FLDD(v), gate):
    below the gate there is no effect to explain, whatever the checks say."""
    n = sum(w is True for w, _ in flags)
    if effect is not None and effect[0] < effect[1]:
        return n, f"{NO_EFFECT} (FLDD {effect[0]:.3f} below the gate {effect[1]:.3f})"
    lo = sum(w is True and not b for w, b in flags)
    low, high = label(lo), label(lo + sum(b for _, b in flags))
    return n, low if low == high else f"{BORDERLINE}: {low} or {high}"


def verdict(checks: Sequence[Check]) -> tuple[int, str]:
    """(number of warnings, label): 0 no warning signs, 1 caution, ≥2 likely illusory; when
    the borderline checks could change the label: "borderline: <low> or <high>"; when FLDD(v)
    is below the effect gate: "no effect to explain (FLDD ... below the gate ...)"."""
    effect = next(((c.value, c.threshold) for c in checks if c.name == "effect"), None)
    return verdict_of([(c.warning, c.borderline) for c in checks], effect)


def warning_word(check: Check) -> str:
    """yes / no (", borderline" when the margin is within the spread); n.a. for a check without
    a value, info for one that never warns."""
    if check.warning is None:
        return NA if check.value != check.value else "info"  # NaN: not measured
    word = "yes" if check.warning else "no"
    return f"{word}, {BORDERLINE}" if check.borderline else word


def verdict_table(checks: Sequence[Check]) -> pd.DataFrame:
    """One row per check (value, threshold, margin, reference, percentile and z in it, spread,
    warning yes/no/borderline/n.a./info, meaning) and a verdict row."""
    rows = [{"check": c.name, "value": c.value, "threshold": c.threshold, "margin": c.margin,
             "spread": c.spread, "reference": c.reference.name if c.reference else "",
             "percentile": c.percentile, "z": c.z, "warning": warning_word(c),
             "meaning": c.meaning} for c in checks]  # fmt: skip
    n, word = verdict(checks)
    rows.append({"check": "verdict", "value": float(n), "warning": word,
                 "meaning": "warnings: 0 none, 1 caution, 2+ likely illusory"})  # fmt: skip
    return pd.DataFrame(rows).set_index("check")
