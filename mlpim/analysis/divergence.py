"""How far a 1-D patch drives an MLP's hidden activations from where real prompts put them.

Two measures, both per pair so that they carry bootstrap intervals over the pairs:

- the dormant ratio: how far the patch along v moves the activation along v's row-space direction
  r, against how far source and base prompts differ along r;
- the off-distribution distance (Grant, Han, Tartaglini, Potts 2025): the earth-mover distance
  between the patched MLP outputs read along W_out·v and the MLP's natural outputs read the same
  way (natural activations over many prompts), in natural standard deviations. A whole-site patch
  puts in a real prompt's activation (distance near 0); divergence in W_out's nullspace is never
  read downstream and so is not measured (it is harmless in their terms).
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis.stats import Est, emd_est, ratio_est, tensor_np


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


def dormant_est(base: Tensor, source: Tensor, v: Tensor, row: Tensor, idx: np.ndarray) -> Est:
    """The dormant ratio mean|pushed| / mean|natural| with its bootstrap (0 without a row part)."""
    if row.norm() < 1e-6:
        return Est(0.0, np.zeros(len(idx)))
    pushed, natural = dormant_terms(base, source, v, row)
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
    base: Float[Tensor, "n m"], source: Float[Tensor, "n m"], v: Float[Tensor, " m"]
) -> Float[Tensor, "n m"]:
    """base + ((source − base)·v) v: the 1-D patch along unit v."""
    b, s, u = base.double(), source.double(), v.double()
    return b + ((s - b) @ u)[:, None] * u[None, :]


def off_est(
    acts: Float[Tensor, "n m"],
    natural: Float[Tensor, "N m"],
    a: Float[Tensor, " m"],
    idx: np.ndarray,
) -> Est:
    """EMD(acts·a, natural·a) / sd(natural·a), resampling the rows of `acts` with `idx`."""
    y_nat = tensor_np(natural.double() @ a)
    sd = float(y_nat.std(ddof=1))
    if not sd > 0:
        return Est(float("nan"), np.array([]))
    return emd_est(tensor_np(acts.double() @ a), y_nat, idx, sd)


def off_distribution(
    base: Tensor, source: Tensor, v: Tensor, w_out: Tensor, natural: Tensor, idx: np.ndarray
) -> tuple[Est, float]:
    """(off-distribution distance of the patch along v, the same for the whole-site patch)."""
    a = readout(v, w_out).to(base.device)
    if a.norm() < 1e-12:
        return Est(0.0, np.zeros(len(idx))), 0.0
    full = off_est(source, natural, a, idx).value
    return off_est(patched(base, source, v), natural, a, idx), full
