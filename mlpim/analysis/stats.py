"""Estimates with bootstrap confidence intervals over the pairs, and 1-D earth-mover distances.

An `Est` carries a value and its bootstrap replicates. Estimates measured on the same pairs share
one resampling (`resample`), so a margin between them (e.g. FLDD(v) − 1.5·FLDD(row part)) has a
paired interval; estimates on different pair sets are resampled independently. Pairs drawn from
a few templates are not independent: `resample` given each pair's cluster (its template) draws
templates first and pairs inside them (a two-stage cluster bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from torch import Tensor

NAN = float("nan")
QUANTILES = 512  # grid of the earth-mover distance between samples of different sizes


@dataclass(frozen=True)
class Est:
    """A value and its bootstrap replicates (empty: no interval)."""

    value: float
    boot: np.ndarray

    def ci(self, level: float) -> tuple[float, float]:
        """The percentile interval at `level` (NaNs without replicates)."""
        b = self.boot[np.isfinite(self.boot)] if self.boot.size else self.boot
        if b.size < 2 or not math.isfinite(self.value):
            return NAN, NAN
        a = (1.0 - level) / 2
        return float(np.quantile(b, a)), float(np.quantile(b, 1 - a))


def fixed(value: float) -> Est:
    """An estimate with no sampling noise measured (no interval)."""
    return Est(float(value), np.array([]))


def combine(f: Callable[..., object], *ests: Est) -> Est:
    """f applied to the values and, replicate by replicate, to the replicates."""
    value = float(f(*(e.value for e in ests)))
    sized = [e.boot.size for e in ests if e.boot.size]
    if not sized:
        return fixed(value)
    n = min(sized)
    reps = [e.boot[:n] if e.boot.size else np.full(n, e.value) for e in ests]
    with np.errstate(divide="ignore", invalid="ignore"):
        return Est(value, np.asarray(f(*reps), dtype=float))


def resample(n: int, n_boot: int, seed: int, clusters: Sequence | None = None) -> np.ndarray:
    """n_boot × n indices drawn with replacement (seeded); shared by every estimate on n pairs.

    With `clusters` (one id per pair; None: a cluster of its own), a two-stage cluster bootstrap:
    each replicate draws the clusters with replacement, then pairs with replacement inside each
    drawn cluster, as many as it holds; those pairs, laid end to end, are spread evenly over the
    n slots (the same count per drawn cluster where clusters are equal). Every pair its own
    cluster: exactly the plain bootstrap's indices.
    """
    rng = np.random.default_rng(seed)
    if clusters is None:
        return rng.integers(0, n, size=(n_boot, n))
    ids, sizes = cluster_ids(clusters, n)
    drawn = rng.integers(0, len(sizes), size=(n_boot, len(sizes)))  # the plain draw when G = n
    ends = np.cumsum(sizes[drawn], axis=1)
    slot = np.arange(n)[None, :] * ends[:, -1:] // n  # each slot's place in the drawn pairs
    row = np.arange(n_boot)[:, None] * (ends[:, -1:].max() + 1)
    which = np.searchsorted((ends + row).ravel(), (slot + row).ravel(), side="right")
    c = drawn.ravel()[which].reshape(n_boot, n)
    member = (rng.random((n_boot, n)) * sizes[c]).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    return order[(np.cumsum(sizes) - sizes)[c] + member]


def cluster_ids(clusters: Sequence, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(each pair's cluster as 0..G−1 in order of first appearance, each cluster's size); a None
    id is a cluster of its own."""
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster ids for {n} pairs")
    seen: dict = {}
    ids = np.array([seen.setdefault(object() if c is None else c, len(seen)) for c in clusters])
    return ids, np.bincount(ids, minlength=len(seen))


def fldd_est(ld: Float[Tensor, " n"], clean: Float[Tensor, " n"], idx: np.ndarray) -> Est:
    """FLDD = 1 − mean(patched LD) / mean(clean LD), resampling the pairs with `idx`."""
    a, c = ld.double().cpu().numpy(), clean.double().cpu().numpy()
    return Est(1.0 - a.mean() / c.mean(), 1.0 - a[idx].mean(1) / c[idx].mean(1))


def ratio_est(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> Est:
    """mean(num) / mean(den) over the pairs, resampled with `idx` (inf when den vanishes)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return Est(_ratio(num.mean(), den.mean()), _ratio(num[idx].mean(1), den[idx].mean(1)))


def _ratio(num, den):
    out = np.where(np.abs(den) > 1e-12, num / np.where(den == 0, 1, den), np.inf)
    return float(out) if np.ndim(out) == 0 else out


def mean_est(values: np.ndarray, n_boot: int, seed: int) -> Est:
    """The mean of a few values (e.g. one per random-MLP seed) with a bootstrap over them."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return fixed(NAN)
    if values.size == 1:
        return fixed(float(values[0]))
    return Est(float(values.mean()), values[resample(values.size, n_boot, seed)].mean(1))


def quantiles(x: np.ndarray, q: int = QUANTILES) -> np.ndarray:
    """The sample's quantiles at q midpoints along the last axis (1-D or 2-D x): numpy's linear
    method to the bit, from one sort instead of np.quantile's partitions (about 30× faster for
    a bootstrap's 1000 resampled rows)."""
    x = np.asarray(x)
    if np.isnan(x).any():
        return np.quantile(x, (np.arange(q) + 0.5) / q, axis=-1).T
    n = x.shape[-1]
    at = (n - 1) * ((np.arange(q) + 0.5) / q)
    low = np.floor(at)
    gamma = at - low
    low = low.astype(np.intp)
    ordered = np.sort(x, axis=-1)
    a, b = ordered[..., low], ordered[..., np.minimum(low + 1, n - 1)]
    diff = b - a
    out = a + diff * gamma
    upper = gamma >= 0.5
    out[..., upper] = (b - diff * (1 - gamma))[..., upper]
    return out


def emd_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Earth-mover (Wasserstein-1) distance between two 1-D samples."""
    return float(np.abs(quantiles(a) - quantiles(b)).mean())


def emd_ests(
    patched: Sequence[np.ndarray], natural: np.ndarray, idx: np.ndarray, nat_idx: np.ndarray
) -> list[Est]:
    """For each patched sample, EMD(patched, natural) in natural sd, resampling the patched pairs
    with `idx` and, in the same replicates, the natural sample with `nat_idx` (NaN without a
    natural spread)."""
    sd = float(natural.std(ddof=1))
    if not sd > 0:
        return [fixed(NAN) for _ in patched]
    nat = natural[nat_idx]
    q_nat, sd_nat = quantiles(nat), nat.std(1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return [
            Est(emd_1d(p, natural) / sd, np.abs(quantiles(p[idx]) - q_nat).mean(1) / sd_nat)
            for p in patched
        ]


def tensor_np(x: Tensor) -> np.ndarray:
    """A float64 numpy copy of a tensor."""
    return x.detach().double().cpu().numpy()


def auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > a negative), ties counting ½."""
    p, n = np.asarray(scores_pos, float)[:, None], np.asarray(scores_neg, float)[None, :]
    if p.size == 0 or n.size == 0:
        return NAN
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def roc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every threshold, from (0, 0) to (1, 1)."""
    cuts = np.unique(np.concatenate([scores_pos, scores_neg]))[::-1]
    fpr = [0.0] + [float((np.asarray(scores_neg) >= c).mean()) for c in cuts]
    tpr = [0.0] + [float((np.asarray(scores_pos) >= c).mean()) for c in cuts]
    return np.array(fpr + [1.0]), np.array(tpr + [1.0])
