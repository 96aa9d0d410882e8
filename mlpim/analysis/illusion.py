"""Warning signs of the MLP-in-the-middle illusion for a 1-D subspace v: pure checks and a verdict.

Every check takes estimates (`mlpim.analysis.stats.Est`: a value and its bootstrap replicates over
the pairs) or plain numbers and returns a `Check`; nothing here runs a model. The rule that
combines them is written down, with its reasons, in docs/verdict-rule.md.

The effect gate: FLDD(v) must exceed max(check.min_effect, a quantile of random directions').
Below it the verdict is "no effect to explain".

Checks about the direction (they decide the verdict):
- nullspace_bridging (MLP hidden sites): the effect needs v's W_out-nullspace part, which alone
  does nothing: FLDD(v) is superadditive over its row-space and nullspace parts.
- dormant_row_part (MLP hidden sites): the patch drives v's row-space direction further than real
  prompts ever differ along it.
- off_distribution (MLP hidden sites): the patched MLP output, read along W_out·v, lies outside
  the distribution of the MLP's natural outputs (earth-mover distance in natural sd).
- generalisation: the effect on held-out pairs falls below a fraction of the train effect.

Checks about the site (reported, never deciding): component_vs_subspace (the whole-site patch
does not carry the effect) and random_mlp (DAS on norm-matched random MLPs reaches as much).
Information: effect (the gate) and alignment (|cos(W_out·v, v_ref)| against random directions).

Every warning is decided on the value; it is *borderline* when the bootstrap interval of its margin
(`check.ci_level`) contains the threshold, on either side, and the gate likewise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import nullspace as ns
from mlpim.analysis.references import Reference, Refs
from mlpim.analysis.stats import Est, combine, fixed

NO_EFFECT = "no effect to explain"
NO_WARNING = "no warning signs"
CAUTION = "caution"
LIKELY_ILLUSORY = "likely illusory"
LABELS = (NO_EFFECT, NO_WARNING, CAUTION, LIKELY_ILLUSORY)  # in order of suspicion
BORDERLINE = "borderline"
NA = "n.a."
NAN = float("nan")
Z_CAP = 50.0  # |margin / bootstrap sd| is capped here in the illusion score


@dataclass(frozen=True)
class Thresholds:
    """The checks' thresholds and interval settings (config `check.*`, conf/check/default.yaml)."""

    min_effect: float
    effect_quantile: float
    component_fraction: float
    null_norm_sq: float
    superadditive: float
    dormant_ratio: float
    off_distribution: float
    random_fraction: float
    generalisation: float
    ci_level: float
    n_boot: int

    @classmethod
    def from_mapping(cls, values: Mapping) -> Thresholds:
        """Thresholds from `check.*` (a mapping holding every field)."""
        return cls(**{f.name: values[f.name] for f in fields(cls)})


MEANINGS = {  # one line each, short enough for the printed table
    "effect": "gate: FLDD(v) vs min_effect and random directions",
    "component_vs_subspace": "site: the whole site does not carry the effect",
    "nullspace_bridging": "the effect needs v's unread (W_out-nullspace) part",
    "dormant_row_part": "patch drives v's read part beyond natural differences",
    "off_distribution": "patched MLP output lies where real prompts never go",
    "alignment": "info: cos(W_out v, v_ref) vs random directions",
    "random_mlp": "site: DAS on random MLPs reaches a similar effect",
    "generalisation": "held-out effect below a fraction of the train effect",
}
CHECKS = tuple(MEANINGS)
DIRECTION = ("nullspace_bridging", "dormant_row_part", "off_distribution", "generalisation")
SITE = ("component_vs_subspace", "random_mlp")
DORMANT = ("dormant_row_part", "off_distribution")  # the dormant half of the illusion
SCOPE = {n: "direction" if n in DIRECTION else "site" if n in SITE else "info" for n in CHECKS}


@dataclass(frozen=True)
class Check:
    """One row of the verdict table; `warning` is None when the check is n.a. or information.

    `warning` is decided on the value alone (the gate is applied by the verdict, so a check below
    the gate still shows whether it would warn). `margin`: signed distance from the threshold,
    positive on the warning side; `ci`: its bootstrap interval; `se`: its bootstrap sd.
    `reference` and `placed`: the distribution the check is placed in and the number placed.
    """

    name: str
    value: float
    threshold: float
    warning: bool | None
    rule: str  # when it warns, in words
    detail: str = ""  # the numbers behind it
    margin: float = NAN
    ci: tuple[float, float] = (NAN, NAN)
    se: float = NAN
    value_ci: tuple[float, float] = (NAN, NAN)
    reference: Reference | None = None
    placed: float | None = None
    applies: bool = True  # False: a precondition fails (e.g. too small a nullspace part)

    @property
    def meaning(self) -> str:
        """What a warning of this check means, in one line."""
        return MEANINGS[self.name]

    @property
    def scope(self) -> str:
        """`direction` (decides the verdict), `site` (a site note) or `info`."""
        return SCOPE[self.name]

    @property
    def percentile(self) -> float:
        """Where the value lies in its reference distribution (NaN without one)."""
        ref, x = self.reference, self.value if self.placed is None else self.placed
        return NAN if ref is None else ref.percentile(x)

    @property
    def z(self) -> float:
        """The value in sd of its reference distribution (NaN without one)."""
        ref, x = self.reference, self.value if self.placed is None else self.placed
        return NAN if ref is None else ref.z(x)

    @property
    def borderline(self) -> bool:
        """The margin's interval contains the threshold (either side of it)."""
        lo, hi = self.ci
        close = math.isfinite(lo) and lo <= 0.0 <= hi
        return self.warning is not None and self.applies and close


def as_est(x: Est | float) -> Est:
    """An estimate from a plain number (no interval) or an estimate."""
    return x if isinstance(x, Est) else fixed(float(x))


def _margin_se(margin: Est) -> float:
    b = margin.boot[np.isfinite(margin.boot)] if margin.boot.size else margin.boot
    return float(b.std(ddof=1)) if b.size >= 2 else NAN


def judged(
    name: str,
    value: Est,
    threshold: Est,
    sign: int,
    applies: bool,
    th: Thresholds,
    rule: str,
    detail: str,
    reference: Reference | None = None,
    placed: float | None = None,
    inclusive: bool = False,
) -> Check:
    """A check warning when sign·(value − threshold) > 0 (≥ 0 when `inclusive`) and it applies."""
    margin = combine(lambda v, t: sign * (v - t), value, threshold)
    over = margin.value >= 0 if inclusive else margin.value > 0
    return Check(
        name,
        value.value,
        threshold.value,
        applies and over,
        rule,
        detail=detail,
        margin=margin.value,
        ci=margin.ci(th.ci_level),
        se=_margin_se(margin),
        value_ci=value.ci(th.ci_level),
        reference=reference,
        placed=placed,
        applies=applies,
    )


def not_applicable(name: str, why: str) -> Check:
    """A check that does not apply to this site or was not asked for."""
    return Check(name, NAN, NAN, None, NA, why)


@dataclass(frozen=True)
class Gate:
    """Whether FLDD(v) is an effect worth explaining, and whether that is a close call."""

    ok: bool
    borderline: bool
    threshold: float
    value: float = NAN


def gate_threshold(refs: Refs, th: Thresholds) -> float:
    """max(min_effect, the random directions' effect_quantile)."""
    q = refs.random_dirs.quantile(th.effect_quantile)
    return max(th.min_effect, q) if math.isfinite(q) else th.min_effect


def effect_check(fldd_v: Est | float, refs: Refs, th: Thresholds) -> Check:
    """The gate's row: FLDD(v) against max(min_effect, random directions' quantile)."""
    fldd_v, t = as_est(fldd_v), gate_threshold(refs, th)
    c = judged(
        "effect",
        fldd_v,
        fixed(t),
        1,
        True,
        th,
        f"FLDD(v) ≥ {t:.3g} (the gate)",
        f"FLDD(v) {fldd_v.value:.3f}; effect worth explaining from {t:.3f}",
        refs.random_dirs,
    )
    return replace(c, warning=None)


def gate_of(checks: Sequence[Check]) -> Gate:
    """The gate from the effect row (an absent row passes)."""
    e = next((c for c in checks if c.name == "effect"), None)
    if e is None:
        return Gate(True, False, NAN)
    lo, hi = e.ci
    close = math.isfinite(lo) and lo <= 0.0 <= hi
    return Gate(e.margin >= 0, close, e.threshold, e.value)


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
    t = combine(lambda a, b: th.superadditive * (np.maximum(a, 0.0) + np.maximum(b, 0.0)), r, n)
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


def dormant_check(ratio: Est | float, refs: Refs, th: Thresholds) -> Check:
    """Dormant ratio ≥ th.dormant_ratio (a real direction gives about 1)."""
    r = as_est(ratio)
    return judged(
        "dormant_row_part",
        r,
        fixed(th.dormant_ratio),
        1,
        True,
        th,
        f"ratio ≥ {th.dormant_ratio}",
        f"patch vs natural movement along the row-space direction: {r.value:.3g}",
        refs.natural_dormant,
        inclusive=True,
    )


def off_distribution_check(off: Est | float, full_off: float, refs: Refs, th: Thresholds) -> Check:
    """EMD of the patched read-out from the natural one ≥ th.off_distribution natural sd."""
    o = as_est(off)
    return judged(
        "off_distribution",
        o,
        fixed(th.off_distribution),
        1,
        True,
        th,
        f"EMD ≥ {th.off_distribution} natural sd",
        f"EMD(patched, natural) along W_out·v: {o.value:.3g} sd (full-site patch {full_off:.3g})",
        refs.natural_off,
        inclusive=True,
    )


def alignment_check(
    v: Float[Tensor, " m"],
    w_out: Float[Tensor, "m d"],
    v_ref: Float[Tensor, " d"],
    n_random: int,
    seed: int,
) -> Check:
    """Information: |cos(W_out·v, v_ref)| against random hidden directions' 95th percentile."""
    cos = abs(ns.cosine(ns.written(v, w_out), v_ref))
    gen = torch.Generator().manual_seed(seed)
    rand = ns.random_output_cosines(w_out, v_ref, n_random, gen).abs()
    q95 = rand.quantile(0.95).item()
    ref = Reference(f"random hidden directions (n={n_random})", tuple(rand.tolist()))
    return Check(
        "alignment",
        cos,
        q95,
        None,
        "never (information only)",
        f"|cos| {cos:.3f}, random q95 {q95:.3f} (n={n_random})",
        reference=ref,
    )


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


@dataclass(frozen=True)
class Verdict:
    """The label, its two ends when borderline checks could change it, and what fired."""

    label: str
    low: str
    high: str
    warned: tuple[str, ...]  # direction checks that warn (firm or borderline)
    site_notes: tuple[str, ...]  # site checks that warn
    gate: Gate

    @property
    def n_warnings(self) -> int:
        """How many checks warn."""
        return len(self.warned)

    @property
    def klass(self) -> str:
        """The label with every borderline verdict pooled as "borderline"."""
        return BORDERLINE if self.low != self.high else self.low


def label_of(gate_ok: bool, warned: set[str]) -> str:
    """The rule's label for a gate and a set of warning direction checks (docs/verdict-rule.md)."""
    if not gate_ok:
        return NO_EFFECT
    if "nullspace_bridging" in warned and warned & set(DORMANT):
        return LIKELY_ILLUSORY
    return CAUTION if warned & set(DIRECTION) else NO_WARNING


def verdict(checks: Sequence[Check]) -> Verdict:
    """The verdict from the gate and the direction checks, borderline ends included."""
    gate = gate_of(checks)
    direction = [c for c in checks if c.scope == "direction" and c.warning is not None]
    firm = {c.name for c in direction if c.warning and not c.borderline}
    maybe = firm | {c.name for c in direction if c.borderline}
    low = label_of(gate.ok and not gate.borderline, firm)
    high = label_of(gate.ok or gate.borderline, maybe)
    label = low if low == high else f"{BORDERLINE}: {low} or {high}"
    if label == NO_EFFECT:
        label = f"{NO_EFFECT} (FLDD {gate.value:.3f} below the gate {gate.threshold:.3f})"
    warned = tuple(c.name for c in direction if c.warning)
    notes = tuple(c.name for c in checks if c.scope == "site" and c.warning)
    return Verdict(label, low, high, warned, notes, gate)


def _z(c: Check | None) -> float:
    """margin / bootstrap sd, capped at ±Z_CAP; −Z_CAP for a check that does not apply."""
    if c is None or c.warning is None or not c.applies or math.isnan(c.margin):
        return -Z_CAP
    if math.isinf(c.margin):
        return math.copysign(Z_CAP, c.margin)
    se = c.se if math.isfinite(c.se) and c.se > 0 else abs(c.margin) or 1.0
    return float(np.clip(c.margin / se, -Z_CAP, Z_CAP))


def illusion_score(checks: Sequence[Check]) -> float:
    """min(z of bridging, max(z of dormant, z of off-distribution)); z = margin / bootstrap sd."""
    by = {c.name: c for c in checks}
    bridge = _z(by.get("nullspace_bridging"))
    dormant = max(_z(by.get(n)) for n in DORMANT)
    return min(bridge, dormant)


def warning_word(check: Check) -> str:
    """yes / no (", borderline"), n.a. for a check without a value, info for one never warning."""
    if check.warning is None:
        return NA if check.value != check.value else "info"  # NaN: not measured
    word = "yes" if check.warning else "no"
    return f"{word}, {BORDERLINE}" if check.borderline else word


def verdict_table(checks: Sequence[Check]) -> pd.DataFrame:
    """One row per check (scope, value, intervals, threshold, margin, warning) and the verdict."""
    rows = [
        {
            "check": c.name,
            "scope": c.scope,
            "value": c.value,
            "ci_low": c.value_ci[0],
            "ci_high": c.value_ci[1],
            "threshold": c.threshold,
            "margin": c.margin,
            "margin_low": c.ci[0],
            "margin_high": c.ci[1],
            "reference": c.reference.name if c.reference else "",
            "percentile": c.percentile,
            "z": c.z,
            "warning": warning_word(c),
            "meaning": c.meaning,
        }
        for c in checks
    ]
    v = verdict(checks)
    rows.append(
        {
            "check": "verdict",
            "value": float(v.n_warnings),
            "warning": v.label,
            "meaning": "decided by the direction checks (docs/verdict-rule.md)",
        }
    )
    return pd.DataFrame(rows).set_index("check")
