"""How far a patch along v (a unit vector, or a k-dim subspace V given by an orthonormal m×k
basis) drives an MLP's hidden activations from where real prompts put them.

Two measures, both per pair so that they carry bootstrap intervals over the pairs:

- the dormant ratio: how far the patch along v moves the activation along v's row-space direction
  r, against how far source and base prompts differ along r. For V, the movement inside V's
  row-space part R (orthonormalised, dimension r ≤ k) against the natural differences there, both
  as Mahalanobis lengths in the natural differences' second moment on R (r = 1: today's ratio,
  the scale cancelling);
- the off-distribution distance (Grant, Han, Tartaglini, Potts 2025): the earth-mover distance
  between the patched MLP outputs read along what v writes into the residual and the MLP's
  natural outputs read the same way (natural activations over many prompts), in natural standard
  deviations, with the same distance of the whole-site patch (a real prompt's activation put in)
  measured on the same pairs; the check reports the difference (`checks.off_distribution`). What
  v writes is v @ W_out as the residual sees it (`mlp_write.residual_w_out`: through the block's
  post-feedforward norm where it has one). Divergence in W_out's nullspace is never read
  downstream and so is not measured (it is harmless in their terms). The bootstrap resamples the
  natural sample too, in the same replicates as the pairs. For V, the sliced earth-mover
  distance inside the subspace V writes to: the mean over `SLICES` seeded random unit directions
  of that subspace of the 1-D distance in natural sd (one written dimension: today's).

A basis with one column is measured exactly as its vector (the same floating-point operations).
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import nullspace as ns
from mlpim.analysis.stats import Est, emd_ests, ratio_est, tensor_np

SLICES = 64  # random directions of the written subspace for the sliced distance (k > 1)


def dormant_terms(
    base: Float[Tensor, "n m"],
    source: Float[Tensor, "n m"],
    v: Float[Tensor, " m"],
    row: Float[Tensor, " m"],
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, |((s−b)·v)(v·r)| and |(s−b)·r| for r = row/‖row‖ (unit v)."""
    r = (row / row.norm()).double()
    diff = (source - base).double()
    pushed = ((diff @ v.double()) * (v.double() @ r)).abs()
    return tensor_np(pushed), tensor_np((diff @ r).abs())


def subspace_dormant_terms(
    base: Float[Tensor, "n m"],
    source: Float[Tensor, "n m"],
    v: Float[Tensor, "m k"],
    row: Float[Tensor, "m r"],
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the Mahalanobis length of the patch's movement inside the orthonormal row part
    `row` and that of (s−b) there, in the second moment of (s−b) on `row` (eigenvalues floored at
    1e-9 of the largest, so that a movement natural differences never make counts as far)."""
    diff, q = (source - base).double(), row.double()
    moved = (diff @ v.double()) @ (v.double().T @ q)
    nat = diff @ q
    lam, vec = torch.linalg.eigh(nat.T @ nat / len(nat))
    lam = lam.clamp_min(1e-9 * max(lam.max().item(), 1e-30))
    white = vec / lam.sqrt()
    return tensor_np((moved @ white).norm(dim=1)), tensor_np((nat @ white).norm(dim=1))


def dormant_est(base: Tensor, source: Tensor, v: Tensor, row: Tensor, idx: np.ndarray) -> Est:
    """The dormant ratio mean|pushed| / mean|natural| with its bootstrap (0 without a row part);
    v a unit vector and row its row-space part, or v a basis (m×k) and row its part (m×k)."""
    if v.ndim == 2 and v.shape[1] == 1:
        v, row = v[:, 0], row[:, 0]
    if v.ndim == 1:
        terms = dormant_terms(base, source, v, row) if row.norm() >= 1e-6 else None
    else:
        q = ns.part_basis(row)
        terms = None if q is None else subspace_dormant_terms(base, source, v, q)
    if terms is None:
        return Est(0.0, np.zeros(len(idx)))
    pushed, natural = terms
    if natural.mean() <= 1e-9 * max(pushed.mean(), 1.0):
        return Est(float("inf") if pushed.mean() > 1e-9 else 0.0, np.array([]))
    return ratio_est(pushed, natural, idx)


def readout(v: Float[Tensor, " m"], w_out: Float[Tensor, "m d"]) -> Float[Tensor, " m"]:
    """The hidden functional W_out·unit(v @ W_out): h·a reads h's MLP output along v's write."""
    out = v.double() @ w_out.double()
    if out.norm() < 1e-12:
        return torch.zeros_like(v, dtype=torch.float64)
    return w_out.double() @ (out / out.norm())


def patched(
    base: Float[Tensor, "n m"], source: Float[Tensor, "n m"], v: Float[Tensor, "m ..."]
) -> Float[Tensor, "n m"]:
    """base + ((source − base)·v) v: the 1-D patch along unit v (a basis V: base + (s − b)VVᵀ)."""
    b, s, u = base.double(), source.double(), v.double()
    if u.ndim == 2:
        return b + ((s - b) @ u) @ u.T
    return b + ((s - b) @ u)[:, None] * u[None, :]


def off_ests(
    moved: Float[Tensor, "n m"],
    source: Float[Tensor, "n m"],
    natural: Float[Tensor, "N m"],
    a: Float[Tensor, " m"],
    idx: np.ndarray,
    nat_idx: np.ndarray,
) -> tuple[Est, Est]:
    """EMD(·a, natural·a) / sd(natural·a) of the patched activations and of the whole-site
    patch's (the source's), resampling the pairs with `idx` and the natural sample with
    `nat_idx` in the same replicates (`stats.emd_ests`)."""
    y = [tensor_np(x.double() @ a) for x in (moved, source, natural)]
    off, full = emd_ests(y[:2], y[2], idx, nat_idx)
    return off, full


def slices(v: Float[Tensor, "m k"], w_out: Float[Tensor, "m d"]) -> Float[Tensor, "m s"]:
    """Hidden functionals reading the MLP output along `SLICES` seeded random unit directions of
    the span V writes to (W_outᵀV's left singular vectors above 1e-9 of the largest, each signed
    by its largest entry: the same for every basis of V; one written dimension: that one); m×0
    when V writes nothing."""
    u, s, _ = torch.linalg.svd(w_out.double().T @ v.double().to(w_out.device), full_matrices=False)
    u = u[:, s > max(1e-9 * s.max().item(), 1e-12)]
    if u.shape[1] == 0:
        return torch.zeros(v.shape[0], 0, dtype=torch.float64, device=w_out.device)
    u = u * torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    theta = torch.ones(1, 1, dtype=torch.float64)
    if u.shape[1] > 1:
        theta = torch.randn(u.shape[1], SLICES, generator=torch.Generator().manual_seed(0)).double()
        theta = theta / theta.norm(dim=0)
    return w_out.double() @ (u @ theta.to(u.device))


def mean_of(ests: list[Est]) -> Est:
    """The mean of estimates resampled alike, replicate by replicate (no interval if one has
    none)."""
    value = float(np.mean([e.value for e in ests]))
    if any(e.boot.size == 0 for e in ests):
        return Est(value, np.array([]))
    return Est(value, np.mean([e.boot for e in ests], axis=0))


def sliced_off(
    base: Tensor,
    source: Tensor,
    v: Tensor,
    w_out: Tensor,
    natural: Tensor,
    idx: np.ndarray,
    nat_idx: np.ndarray,
) -> tuple[Est, Est]:
    """`off_distribution` of a k-dim patch: the mean over `slices` of each one's distance."""
    a = slices(v, w_out).to(base.device)
    if a.shape[1] == 0:
        return Est(0.0, np.zeros(len(idx))), Est(0.0, np.zeros(len(idx)))
    moved = patched(base, source, v)
    per = [off_ests(moved, source, natural, a[:, j], idx, nat_idx) for j in range(a.shape[1])]
    return mean_of([p[0] for p in per]), mean_of([p[1] for p in per])


def off_distribution(
    base: Tensor,
    source: Tensor,
    v: Tensor,
    w_out: Tensor,
    natural: Tensor,
    idx: np.ndarray,
    nat_idx: np.ndarray,
) -> tuple[Est, Est]:
    """(off-distribution distance of the patch along v, the same for the whole-site patch), in
    one resampling of the pairs (`idx`) and of the natural sample (`nat_idx`); v a unit vector
    or a basis (m×k: the sliced distance, `sliced_off`). `w_out`: W_out as the residual sees it
    (`mlp_write.residual_w_out`)."""
    if v.ndim == 2 and v.shape[1] > 1:
        return sliced_off(base, source, v, w_out, natural, idx, nat_idx)
    v = v.reshape(-1)
    a = readout(v, w_out).to(base.device)
    if a.norm() < 1e-12:
        return Est(0.0, np.zeros(len(idx))), Est(0.0, np.zeros(len(idx)))
    return off_ests(patched(base, source, v), source, natural, a, idx, nat_idx)
