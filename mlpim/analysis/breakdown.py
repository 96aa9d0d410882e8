"""Which part of V does it: V's principal directions of the patched movement, each patched alone.

On the test pairs the patch along V (orthonormal m×k) moves the site activation by
V Vᵀ(source − base). The SVD of the coordinates (source − base)·V (n×k) gives k orthonormal
directions inside span(V), ordered by their share of the total squared movement. Each direction
u is patched alone: its FLDD with its interval, the effect gate against random unit directions,
and at an MLP hidden site (mlp_post) nullspace bridging, dormant row part and off-distribution,
with ‖null part‖². A table, not a verdict per direction: the verdict is V's
(`measure.measure_checks`), and nothing here changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import illusion
from mlpim.analysis import measure as M
from mlpim.analysis import references as R
from mlpim.analysis.checks import BRIDGING, DORMANT
from mlpim.analysis.checks.base import Check, not_applicable
from mlpim.analysis.checks.effect import effect_check
from mlpim.analysis.stats import Est
from mlpim.engine.patching import subspace

CHECKED = ("effect", *BRIDGING, *DORMANT)  # the checks measured per direction, in this order
NAN = float("nan")


@dataclass(frozen=True)
class Principal:
    """V's principal directions of the patched movement, largest share first."""

    directions: Float[Tensor, "m k"]  # orthonormal, inside span(V); in V's dtype and device
    coef: Float[Tensor, "k k"]  # column j: direction j in V's columns (float64)
    share: np.ndarray  # each direction's share of the total squared movement (sums to 1)


def principal_directions(site: M.SiteData, v: Float[Tensor, "m k"]) -> Principal:
    """The SVD of the test pairs' (source − base)·V; each direction signed so that the patch
    moves the activation along it on average (NaN shares when V moves nothing)."""
    base, source = M.acts(site.splits["test"])
    vd = v.detach().double().cpu()
    x = (source - base).double().cpu() @ vd
    _, s, vh = torch.linalg.svd(x, full_matrices=True)
    coef = vh.T * torch.where((x @ vh.T).sum(0) < 0, -1.0, 1.0).double()
    sq = np.zeros(v.shape[1])
    sq[: len(s)] = s.numpy() ** 2
    share = sq / sq.sum() if sq.sum() > 0 else np.full_like(sq, NAN)
    return Principal((vd @ coef).to(v), coef, share)


def direction_checks(
    model, site: M.SiteData, u: Float[Tensor, "m 1"], refs: R.Refs
) -> tuple[Est, list[Check], float]:
    """FLDD of patching u alone on the test pairs, its checks (`CHECKED` order), ‖null part‖²."""
    test, idx = site.splits["test"], site.idx["test"]
    if site.kind != "mlp_post":
        fl = M.pair_lds(model, test, subspace(u)).fldd(idx)
        why = f"needs an MLP hidden site (mlp_post), not {site.kind}"
        return fl, [effect_check(fl, refs, site.th), *map(_na(why), CHECKED[1:])], NAN
    fl, proj, null = M.part_fldds(model, site, u)
    _, checks = M.mlp_direction_checks(site, u, fl, proj, null, {})
    return fl["das"], [effect_check(fl["das"], refs, site.th), *checks], null.norm().item() ** 2


def _na(why: str):
    return lambda name: not_applicable(name, why)


def word(c: Check) -> str:
    """The check's warning word; the gate's: passes / below the gate (", borderline")."""
    if c.name != "effect" or c.value != c.value:
        return illusion.warning_word(c)
    gate = illusion.gate_of([c])
    said = "passes" if gate.ok else "below the gate"
    return f"{said}, {illusion.BORDERLINE}" if gate.borderline else said


def table_row(j: int, p: Principal, fl: Est, checks: list[Check], null_sq: float, level: float):
    """One direction's row: share, FLDD and interval, ‖null‖², each check, its coefficients."""
    lo, hi = fl.ci(level)
    row = {"direction": f"u{j + 1}", "share": float(p.share[j]), "fldd": fl.value}
    row |= {"fldd_low": lo, "fldd_high": hi, "null_norm_sq": null_sq}
    for c in checks:
        row |= {c.name: c.value, f"{c.name}_threshold": c.threshold, f"{c.name}_warning": word(c)}
    return row | {f"coef_v{i + 1}": float(x) for i, x in enumerate(p.coef[:, j])}


def breakdown(
    model, site: M.SiteData, v: Float[Tensor, "m k"], n_random: int, seed: int
) -> pd.DataFrame:
    """One row per principal direction of V's patched movement (largest share first); each
    direction's gate against `n_random` random unit directions (seeded), not V's k-dim ones."""
    p = principal_directions(site, v)
    one_d = R.random_direction_reference(model, site.splits["test"], n_random, seed)
    refs = replace(site.refs, random_dirs=one_d)
    rows = []
    for j in range(v.shape[1]):
        fl, checks, null_sq = direction_checks(model, site, p.directions[:, j : j + 1], refs)
        rows.append(table_row(j, p, fl, checks, null_sq, site.th.ci_level))
    return pd.DataFrame(rows)
