"""What every check is made of: its registry entry (`Spec`), its row (`Check`) and how it is judged.

A check module declares one `Spec` with `register` and a pure judging function that turns the
measured inputs into a `Check` (usually through `judged`). `Check.to_rows` and `Check.from_rows`
are its tidy metric rows in metrics.csv.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mlpim.analysis.references import Reference
from mlpim.analysis.rows import metric_rows
from mlpim.analysis.stats import Est, combine, fixed

if TYPE_CHECKING:
    from mlpim.analysis.checks import Thresholds

NA = "n.a."
NAN = float("nan")
SCOPES = ("direction", "site", "info")  # direction checks decide the verdict; site ones note
HALVES = ("bridging", "dormant")  # the two halves of the illusion a direction check speaks for
CHECK_METRICS = (
    "check_value",
    "value_low",
    "value_high",
    "threshold",
    "warning",
    "applies",
    "margin",
    "margin_low",
    "margin_high",
    "margin_se",
    "percentile",
    "z",
    "borderline",
)


@dataclass(frozen=True)
class Threshold:
    """One setting `check.<name>` (set in conf/check/default.yaml) and what it means."""

    name: str
    meaning: str
    kind: type = float


@dataclass(frozen=True)
class Spec:
    """One check in the registry: everything the verdict, the config and the report ask of it."""

    name: str
    order: int  # its place in the verdict table, the metrics and the figure
    scope: str  # one of SCOPES
    meaning: str  # what a warning means, one line short enough for the printed table
    judge: Callable[..., Check]  # the pure function from measured inputs to its `Check`
    thresholds: tuple[Threshold, ...] = ()
    half: str | None = None  # the half of the illusion (HALVES) a direction check speaks for
    on_value_scale: bool = False  # the figure draws its reference on the value's own axis

    def __post_init__(self) -> None:
        if self.scope not in SCOPES or self.half not in (None, *HALVES):
            raise ValueError(f"check {self.name}: scope {self.scope!r}, half {self.half!r}")


SPECS: dict[str, Spec] = {}  # filled by `register`, one entry per check module


def register(spec: Spec) -> Spec:
    """Add a check to the registry (each check module calls it once)."""
    if spec.name in SPECS:
        raise ValueError(f"check {spec.name} is registered twice")
    SPECS[spec.name] = spec
    return spec


def _flag(warning: bool | None, b: bool) -> float:
    return NAN if warning is None else float(b)


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
        return SPECS[self.name].meaning

    @property
    def scope(self) -> str:
        """`direction` (decides the verdict), `site` (a site note) or `info`."""
        return SPECS[self.name].scope

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

    def to_rows(self, keys: dict) -> list[dict]:
        """The check as tidy metric rows (`CHECK_METRICS`; flags 1/0/NaN)."""
        values = (
            self.value,
            *self.value_ci,
            self.threshold,
            _flag(self.warning, self.warning),
            float(self.applies),
            self.margin,
            *self.ci,
            self.se,
            self.percentile,
            self.z,
            _flag(self.warning, self.borderline),
        )
        metrics = dict(zip(CHECK_METRICS, values, strict=True))
        return metric_rows(metrics, intervention=self.name, split="test", **keys)

    @classmethod
    def from_rows(cls, name: str, r: pd.Series) -> Check:
        """The check `name` from its metric rows (`r`: value by metric, as `to_rows` wrote)."""
        warn = None if math.isnan(r.warning) else bool(r.warning)
        return cls(
            name,
            r.check_value,
            r.threshold,
            warn,
            "",
            margin=r.margin,
            ci=(r.margin_low, r.margin_high),
            se=r.margin_se,
            value_ci=(r.value_low, r.value_high),
            applies=bool(r.applies),
        )


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
