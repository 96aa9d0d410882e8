"""Directions with a planted answer: illusions by the paper's definition, and real MLP directions.

Planted illusion at an MLP hidden site (Makelov et al.: v = v_irrelevant + v_dormant):
- irrelevant: the W_out-nullspace part of the ABB-minus-BAB mean hidden difference (it separates
  the patterns and W_out never reads it);
- dormant: the minimum-variance preimage of the target t (the residual circuit direction): the d
  minimising dᵀCd subject to W_outᵀd = t, C the ridge-regularised covariance of the site's
  natural activations over many prompts. Its natural variance is as small as any direction that
  writes t can have: it has a causal effect and (nearly) never varies;
- illusory(θ) = cos θ · irrelevant + sin θ · unit(dormant), normalised.

Planted real direction (a rank-1 W_out edit): a hidden direction u that already varies with the
pattern (centred: orthogonal to the mean activation, so it reads zero on average) is made to
write the variable along t: W_out' = W_out + α u tᵀ. In the edited model the MLP carries the
variable along t through u (its whole-MLP patch carries the effect) and u is its mechanism.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import nullspace as ns
from mlpim.engine.interventions import Prepared

NAN = float("nan")


def covariance(natural: Float[Tensor, "n m"], ridge: float) -> Float[Tensor, "m m"]:
    """The natural activations' covariance plus λI, λ = ridge · (its mean eigenvalue), float64."""
    x = natural.double()
    x = x - x.mean(0)
    cov = x.T @ x / max(x.shape[0] - 1, 1)
    lam = ridge * float(torch.trace(cov)) / cov.shape[0]
    return cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def min_norm_preimage(w_out: Float[Tensor, "m d"], target: Float[Tensor, " d"]) -> Tensor:
    """The d of least norm with W_outᵀd = target (it lies in W_out's row space), float64."""
    w = w_out.double()
    return torch.linalg.lstsq(w.T, target.double()[:, None]).solution[:, 0]


def min_variance_preimage(
    w_out: Float[Tensor, "m d"], cov: Float[Tensor, "m m"], target: Float[Tensor, " d"]
) -> Tensor:
    """argmin dᵀ C d subject to W_outᵀd = target: d = C⁻¹W (WᵀC⁻¹W)⁻¹ t (float64)."""
    w, c = w_out.double(), cov.double()
    ciw = torch.linalg.solve(c, w)  # C⁻¹W, m × d
    a = torch.linalg.lstsq(w.T @ ciw, target.double()[:, None]).solution
    return (ciw @ a)[:, 0]


def variance_percentile(
    natural: Float[Tensor, "n m"], d: Tensor, w_out: Tensor, n_random: int, seed: int
) -> tuple[float, float]:
    """(natural variance of unit d, its percentile among n random unit row-space directions')."""
    q = ns.row_space_basis(w_out).double()
    gen = torch.Generator().manual_seed(seed)
    r = q @ torch.randn(q.shape[1], n_random, generator=gen, dtype=torch.float64)
    r = r / r.norm(dim=0, keepdim=True)
    x = natural.double() - natural.double().mean(0)
    var = lambda u: (x @ u).pow(2).mean(0)  # noqa: E731
    mine = float(var(d.double() / d.norm()))
    return mine, 100.0 * float((var(r) <= mine).double().mean())


def oriented(v: Tensor, along: Tensor) -> Tensor:
    """v with its sign chosen to point along `along` (a DAS direction's sign is arbitrary)."""
    return v if float(v @ along) >= 0 else -v


def mix(irrelevant: Tensor, dormant: Tensor, degrees: float) -> Tensor:
    """cos θ · irrelevant + sin θ · unit(dormant), normalised."""
    t = math.radians(degrees)
    v = math.cos(t) * irrelevant + math.sin(t) * dormant / dormant.norm()
    return v / v.norm()


def centred(u: Tensor, mean_act: Tensor) -> Tensor:
    """Unit u made orthogonal to the mean activation (so h·u averages 0 over natural prompts)."""
    m = mean_act.double() / mean_act.double().norm()
    c = u.double() - (u.double() @ m) * m
    return (c / c.norm()).to(u.dtype)


def edit_delta(
    u: Float[Tensor, " m"], target: Float[Tensor, " d"], alpha: float, jac: Tensor | None = None
) -> Float[Tensor, "m d"]:
    """ΔW_out = α · u ⊗ p: the block then writes α (h·u) along unit(target) into the residual.
    p = unit(target) where the block adds its MLP's output as it is; behind a norm, p solves
    J p = unit(target), J the norm's mean Jacobian (`mlp_write.residual_jacobian`): to first order."""
    t = target.double() / target.double().norm()
    p = t if jac is None else torch.linalg.lstsq(jac.double(), t[:, None]).solution[:, 0]
    return alpha * torch.outer(u.double(), p)


def edit_alpha(train: list[Prepared], u: Tensor, resid_gap: float, strength: float) -> float:
    """α so that the edit's write differs between patterns by strength × the residual gap."""
    base = torch.cat([p.base_act for p in train]).double()
    source = torch.cat([p.source_act for p in train]).double()
    moved = float(((source - base) @ u.double()).abs().mean())
    return strength * resid_gap / max(moved, 1e-12)


# ---------------------------------------------------------------- any task: the variable's movement


def differences(prepared: list[Prepared]) -> Float[Tensor, "n m"]:
    """source − base site activations over the pairs (float64): how the variable moves the site."""
    base = torch.cat([p.base_act for p in prepared]).double()
    return torch.cat([p.source_act for p in prepared]).double() - base


def oriented_by(u: Tensor, moved: Float[Tensor, "n m"], ref: Float[Tensor, " n"]) -> Tensor:
    """u with its sign chosen so that its movement over the pairs covaries positively with `ref`."""
    return u if float((moved @ u.double()) @ ref.double()) >= 0 else -u


def variable_direction(prepared: list[Prepared]) -> Float[Tensor, " m"]:
    """The unit direction the variable moves the site along most (top uncentred principal
    direction of source − base; any task, its sign arbitrary)."""
    _, _, vh = torch.linalg.svd(differences(prepared), full_matrices=False)
    return vh[0]


def unit_null_part(v: Tensor, w_out: Tensor, avoid: Tensor | None = None) -> Tensor | None:
    """The unit W_out-nullspace part of v, orthogonal to `avoid` too (it stays in the nullspace:
    only `avoid`'s own nullspace part is taken out); None if it vanishes."""
    null = ns.split(v.double(), w_out)[1].double()
    if avoid is not None:
        a = ns.split(avoid.double(), w_out)[1].double()
        a = a / a.norm() if a.norm() > 1e-12 else a
        null = null - (null @ a) * a
    return None if null.norm() < 1e-9 else null / null.norm()


def decorrelated(z: Tensor, n_c: Tensor, moved: Float[Tensor, "n m"], r: Tensor) -> Tensor:
    """Unit z − b·n_c with b such that its movement has zero covariance with r's over the pairs."""
    dr = moved @ r.double()
    dr = dr - dr.mean()
    cz, cc = float((moved @ z.double()) @ dr), float((moved @ n_c.double()) @ dr)
    out = z.double() - (cz / cc if abs(cc) > 1e-12 else 0.0) * n_c.double()
    return out / out.norm()


def random_null_direction(w_out: Tensor, seed: int) -> Tensor:
    """A seeded random unit direction of W_out's nullspace (float64)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(w_out.shape[0], generator=gen, dtype=torch.float64)
    return unit_null_part(z, w_out)


# ---------------------------------------------------------------- dormant pathways


def low_moment_direction(
    natural: Float[Tensor, "n m"], w_out: Float[Tensor, "m d"], extra: int = 32
) -> Tensor:
    """A unit hidden direction real prompts do not move and W_out does not read: among the
    directions supported on the d + `extra` neurons of least second moment on `natural` that lie
    in W_out's nullspace (at least `extra` dimensions), orthogonal to the mean activation, the one
    of least variance on `natural`."""
    x = natural.double()
    axes = torch.argsort((x * x).mean(0))[: min(w_out.shape[1] + extra, x.shape[1])]
    q_row = ns.row_space_basis(w_out)
    _, sv, vh = torch.linalg.svd(q_row[axes].T, full_matrices=True)  # Q_rowᵀ E, E = those axes
    rank = int((sv > 1e-9 * max(float(sv.max()), 1e-30)).sum())
    span = torch.zeros(x.shape[1], len(axes) - rank, dtype=torch.float64)
    span[axes] = vh[rank:].T  # supported on those neurons, and W_out reads none of it
    m = span @ (span.T @ x.mean(0))  # the mean's part inside the span: removed within it
    if m.norm() > 1e-12:
        m = m / m.norm()
        span = span - torch.outer(m, m @ span)
    u, sv, _ = torch.linalg.svd(span, full_matrices=False)
    q = u[:, sv > 1e-6 * sv.max()]
    xc = (x - x.mean(0)) @ q
    _, vec = torch.linalg.eigh(xc.T @ xc)
    d = q @ vec[:, 0]
    return d / d.norm()


def hidden_percentile(natural: Float[Tensor, "n m"], d: Tensor, n_random: int, seed: int) -> float:
    """The percentile of unit d's variance on `natural` among n random unit hidden directions'."""
    x = natural.double() - natural.double().mean(0)
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(x.shape[1], n_random, generator=gen, dtype=torch.float64)
    r = r / r.norm(dim=0, keepdim=True)
    var = lambda u: (x @ u).pow(2).mean(0)  # noqa: E731
    return 100.0 * float((var(r) <= var(d.double() / d.norm())).double().mean())


def pathway_beta(moved_n: Float[Tensor, " n"], gap: float, strength: float) -> float:
    """β for the edit β·d ⊗ t̂: patching the 45° mix of n and d writes strength × the residual's
    own gap along t (the patch moves d by ½·Δ(h·n) there)."""
    return strength * gap / max(0.5 * float(moved_n.abs().mean()), 1e-12)


# ---------------------------------------------------------------- the truth principle

PRINCIPLE_RATIO = 2.0  # illusory: the patch moves the read part more than 2× as far as prompts do


def read_movement(
    v: Tensor, w_out: Tensor, moved: Float[Tensor, "n m"], sign: Float[Tensor, " n"]
) -> dict[str, float]:
    """How a 1-D patch along unit v = c·r + s·n moves its read part r (row space) per pair:
    P = c²·Δr + cs·Δn, where prompts move it by Δr. Along the variable (σ = `sign`, ±1 per pair:
    which way the variable moves the residual), ρ = mean(Δn·σ) / mean(Δr·σ) and
    m = |mean(P·σ)| / |mean(Δr·σ)| = |c² + cs·ρ|: the patched movement of the read part in units
    of the natural one (`principle_truth`); var_ratio = sd(Δn) / sd(Δr)."""
    row, null = ns.split(v.double(), w_out)
    c, s = float(row.norm()), float(null.norm())
    out = {"read_c2": c * c, "null_norm_sq": s * s, "rho": NAN, "var_ratio": NAN, "m": NAN}
    if c < 1e-9:
        return out
    dr = moved @ (row.double() / c)
    dn = moved @ (null.double() / s) if s > 1e-9 else torch.zeros_like(dr)
    sign = sign.double()
    natural, driven = float((dr * sign).mean()), float((dn * sign).mean())
    rho = driven / natural if abs(natural) > 1e-30 else math.copysign(math.inf, driven)
    out |= {"rho": rho, "var_ratio": float(dn.std()) / max(float(dr.std()), 1e-30)}
    return out | {"m": abs(c * c + c * s * rho) if math.isfinite(rho) else math.inf}


def principle_truth(m: float) -> str:
    """illusory when more than half of what the patch moves the read part lies beyond how far
    real prompts move it (m > 2), which only the nullspace part can supply; else real."""
    return "illusory" if m > PRINCIPLE_RATIO else "real"


def aligned_null_direction(
    moved: Float[Tensor, "n m"], w_out: Tensor, sign: Float[Tensor, " n"]
) -> Tensor:
    """The unit W_out-nullspace direction that moves most along the variable: the nullspace part
    of mean(Δh·σ), which maximises mean(Δn·σ) over unit nullspace directions."""
    return unit_null_part((moved * sign.double()[:, None]).mean(0), w_out)


# ---------------------------------------------------------------- k-dim subspaces (issue 31)


def rotated(columns: Float[Tensor, "m k"], seed: int) -> Float[Tensor, "m k"]:
    """An orthonormal basis of the columns' span turned by a seeded random k×k rotation, so that
    no column is one of the given ones."""
    q = torch.linalg.qr(columns.double())[0]
    gen = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(q.shape[1], q.shape[1], generator=gen, dtype=torch.float64))[
        0
    ]
    return q @ rot


def hidden_in_subspace(v: Tensor, w_out: Tensor, k: int, seed: int, avoid) -> Float[Tensor, "m k"]:
    """Unit v plus k−1 seeded random W_out-nullspace directions (they do nothing when patched),
    orthogonal to v and to `avoid`, rotated so that no column is v."""
    gen = torch.Generator().manual_seed(seed)
    cols = [v.double() / v.norm()]
    while len(cols) < k:
        z = torch.randn(w_out.shape[0], generator=gen, dtype=torch.float64)
        z = ns.split(z, w_out)[1].double()
        for c in [*cols, *(a.double() / a.norm() for a in avoid)]:
            z = z - (z @ c) * c
        cols.append(z / z.norm())
    return rotated(torch.stack(cols, 1), seed)


def real_subspace(u: Tensor, prepared: list[Prepared], k: int) -> Float[Tensor, "m k"]:
    """u and the k−1 top natural directions of the pairs' differences orthogonal to it (the
    directions the variable moves), rotated: a real subspace whose mechanism is u."""
    moved = differences(prepared)
    moved = moved - torch.outer(moved @ u.double(), u.double()) / float(u.double() @ u.double())
    _, _, vh = torch.linalg.svd(moved, full_matrices=False)
    return rotated(torch.stack([u.double(), *vh[: k - 1]], 1), k)
