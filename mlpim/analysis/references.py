"""Reference distributions for the illusion checks, measured on the same model, site and task.

Each check's value is placed among what the same check gives for directions whose status is
known:

- random unit directions at the site (for a k-dim subspace, random k-dim subspaces): the effect
  (FLDD) that needs no mechanism (the gate);
- DAS on norm-matched random MLPs over several seeds, trained for up to `method.epochs`, all
  seeds as one batched problem, each stopped once converged (`mlpim.analysis.controls`,
  `mlpim.engine.das.fit_many`): the effect DAS reaches with no mechanism (a site check);
- the site's directions of natural variation (top principal directions of source-minus-base
  activation differences on the train pairs): directions real prompts do move along, for the
  dormant ratio, nullspace bridging and the off-distribution measure.

`Reference` places a value in such a distribution (percentile, z-score).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mlpim import reuse
from mlpim.analysis import controls
from mlpim.engine.das import DasSettings
from mlpim.engine.interventions import Prepared, patched_fldd, prepare
from mlpim.engine.models import fingerprint
from mlpim.engine.patching import subspace, work_dtype

NAN = float("nan")


@dataclass(frozen=True)
class Reference:
    """Values one check's statistic takes on directions of known status."""

    name: str
    values: tuple[float, ...] = ()

    def finite(self) -> np.ndarray:
        """The finite values as an array."""
        a = np.asarray(self.values, dtype=float)
        return a[np.isfinite(a)]

    def percentile(self, x: float) -> float:
        """Share (in %) of the reference at or below x; NaN for an empty reference."""
        a = self.finite()
        return NAN if a.size == 0 or math.isnan(x) else 100.0 * float((a <= x).mean())

    @property
    def spread(self) -> float:
        """Standard deviation of the reference (NaN with fewer than 2 values)."""
        a = self.finite()
        return float(a.std(ddof=1)) if a.size >= 2 else NAN

    def z(self, x: float) -> float:
        """(x − mean) / spread; ±inf for an infinite x, NaN without a spread."""
        a, s = self.finite(), self.spread
        if math.isnan(s) or math.isnan(x):
            return NAN
        if math.isinf(x):
            return x
        return (x - float(a.mean())) / max(s, 1e-12)

    def quantile(self, q: float) -> float:
        """The q-quantile of the finite values (NaN when empty)."""
        a = self.finite()
        return float(np.quantile(a, q)) if a.size else NAN


def _ref(name: str):
    return field(default_factory=lambda: Reference(name))


@dataclass(frozen=True, kw_only=True)
class Refs:
    """The references of one site (by keyword); a missing one leaves its checks unplaced."""

    random_dirs: Reference = _ref("random directions")
    random_mlp: Reference = _ref("random-MLP DAS")
    natural_dormant: Reference = _ref("natural directions")
    natural_bridging: Reference = _ref("natural directions")
    natural_off: Reference = _ref("natural directions")


def random_unit_directions(m: int, n: int, seed: int) -> Float[Tensor, "n m"]:
    """n random unit vectors of width m (float64, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return r / r.norm(dim=1, keepdim=True)


def natural_directions(
    base: Float[Tensor, "n m"], source: Float[Tensor, "n m"], k: int
) -> Float[Tensor, "k m"]:
    """Top-k principal directions (uncentred) of the source-minus-base differences."""
    _, s, vh = torch.linalg.svd((source - base).double(), full_matrices=False)
    k = min(k, int((s > 1e-9 * s.max()).sum()))
    return vh[:k]


def direction_fldds(
    model, prepared: list[Prepared], dirs: Float[Tensor, "k m"], desc: str
) -> list[float]:
    """FLDD of patching along each direction (one row of `dirs` at a time)."""
    act = prepared[0].base_act
    dirs = dirs.to(act.device, work_dtype(act))
    bar = tqdm(dirs, desc=desc, leave=False)
    return [patched_fldd(model, prepared, subspace(u[:, None] / u.norm())) for u in bar]


def random_subspaces(m: int, n: int, k: int, seed: int) -> Float[Tensor, "n m k"]:
    """Orthonormal bases of n random k-dim subspaces of width m (float64, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, m, k, generator=gen, dtype=torch.float64))[0]


def subspace_fldds(
    model, prepared: list[Prepared], bases: Float[Tensor, "n m k"], desc: str
) -> list[float]:
    """FLDD of patching each subspace (one orthonormal basis of `bases` at a time)."""
    act = prepared[0].base_act
    bases = bases.to(act.device, work_dtype(act))
    bar = tqdm(bases, desc=desc, leave=False)
    return [patched_fldd(model, prepared, subspace(b)) for b in bar]


def random_direction_reference(
    model, test: list[Prepared], n: int, seed: int, k: int = 1
) -> Reference:
    """FLDD of n random unit directions at the site (k > 1: random k-dim subspaces), on the test
    pairs."""
    pairs = lambda: reuse.digest([p.pairs for p in test])  # noqa: E731
    key = lambda: (*reuse.model_key(model), pairs(), test[0].name, test[0].engine, n, seed, k)  # noqa: E731
    return reuse.memo("random_dirs", key, lambda: _random_dirs(model, test, n, seed, k))


def _random_dirs(model, test: list[Prepared], n: int, seed: int, k: int) -> Reference:
    m = test[0].base_act.shape[-1]
    if k == 1:
        dirs = random_unit_directions(m, n, seed)
        values = direction_fldds(model, test, dirs, f"reference: {n} random directions")
        return Reference(f"random directions (n={len(values)})", tuple(values))
    bases = random_subspaces(m, n, k, seed)
    values = subspace_fldds(model, test, bases, f"reference: {n} random {k}-dim subspaces")
    return Reference(f"random {k}-dim subspaces (n={len(values)})", tuple(values))


def random_mlp_fldds(
    model, aug: dict[str, list[Prepared]], layer: int, method: DasSettings, seeds: range
) -> tuple[list[float], dict[int, pd.DataFrame]]:
    """Per seed, the test FLDD of DAS on a norm-matched random MLP; the histories. One run per
    seed, each batch order shuffled by its own seed (`reference_mode=serial`)."""
    d = model.cfg.d_model
    values, histories = [], {}
    for seed in tqdm(seeds, desc=f"reference: random-MLP DAS L{layer}", leave=False):
        mlp = controls.matched_random_mlp(model, *controls.split_acts(aug["train"], d), seed)
        patch, hist = controls.train_random_das(
            model, aug["train"], None, layer, mlp, method, seed, progress=False
        )
        with torch.no_grad():
            values.append(patched_fldd(model, aug["test"], patch))
        histories[seed] = hist
    return values, histories


def random_mlp_fldds_batched(
    model, aug: dict[str, list[Prepared]], layer: int, method: DasSettings, seeds: range
) -> tuple[list[float], dict[int, pd.DataFrame]]:
    """`random_mlp_fldds` with every seed trained in one batched problem, the batches in one
    order for all (`controls.train_random_das_many`; `reference_mode=batched`)."""
    mid, out = controls.split_acts(aug["train"], model.cfg.d_model)
    mlps = [controls.matched_random_mlp(model, mid, out, seed) for seed in seeds]
    patches, hists = controls.train_random_das_many(
        model, aug["train"], layer, mlps, method, list(seeds)
    )
    with torch.no_grad():
        values = [patched_fldd(model, aug["test"], p) for p in patches]
    return values, dict(zip(seeds, hists, strict=True))


class Store(Protocol):
    """Where measured references are kept between runs (the runner gives a file-backed one)."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...


def reference_key(
    model,
    splits: dict[str, list[Prepared]],
    layer: int,
    method: DasSettings,
    seeds,
    mode: str = "batched",
) -> str:
    """Content hash of a random-MLP reference's inputs: weights, layer, pairs, DAS, engine, seeds,
    mode."""
    h = hashlib.sha256()
    settings = asdict(method) | {"engine": splits["train"][0].engine, "mode": mode}
    h.update(json.dumps([fingerprint(model), layer, settings, list(seeds)]).encode())
    for split in ("train", "test"):
        for p in splits[split]:
            for t in (
                p.pairs.base.tokens,
                p.pairs.base.mask,
                p.pairs.source.tokens,
                p.pairs.source.mask,
                p.pairs.label,
            ):
                h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def serial_splits(
    model, splits: dict[str, list[Prepared]], layer: int
) -> dict[str, list[Prepared]]:
    """The pairs prepared again at `mlp_out` of `layer`, then with resid_mid appended: the
    reference's preparation before the shared one (`reference_mode=serial`, for
    `make bench-check`)."""
    engine = splits["train"][0].engine
    return {
        s: controls.with_resid_mid(
            model, prepare(model, [p.pairs for p in ps], "mlp_out", layer, engine), layer
        )
        for s, ps in splits.items()
    }


def random_mlp_name(n: int, method: DasSettings, epochs_run: list[int]) -> str:
    """The reference's name: seeds, epochs (how many ran, where a run stopped early), dimension."""
    epochs = f"{method.epochs} epochs"
    if epochs_run and min(epochs_run) < method.epochs:
        lo, hi = min(epochs_run), max(epochs_run)
        epochs = f"{lo if lo == hi else f'{lo}-{hi}'} of {epochs}, stopped once converged"
    dim = f", dim {method.dim}" if method.dim > 1 else ""
    return f"random-MLP DAS ({n} seeds, {epochs}{dim})"


def random_mlp_reference(
    model,
    splits: dict[str, list[Prepared]],
    layer: int,
    method: DasSettings,
    seeds: range,
    store: Store | None = None,
    mode: str = "batched",
) -> tuple[Reference, dict[int, pd.DataFrame]]:
    """The random-MLP DAS test FLDD of each seed (from `store` when it holds it); histories.
    `mode`: batched (one problem for every seed, on the splits' own preparation) or serial (one
    run per seed, on the pairs prepared again: the path before batching)."""
    key = reference_key(model, splits, layer, method, seeds, mode)
    hit = store.get(key) if store is not None else None
    if hit is not None:
        values, runs = list(hit["fldd"]), list(hit.get("epochs_run", []))
        return Reference(random_mlp_name(len(values), method, runs), tuple(values)), {}
    two = {k: splits[k] for k in ("train", "test")}
    if mode == "serial":
        aug, fldds = serial_splits(model, two, layer), random_mlp_fldds
    else:
        aug, fldds = controls.augmented_splits(model, two, layer), random_mlp_fldds_batched
    values, histories = fldds(model, aug, layer, method, seeds)
    runs = [len(h) for h in histories.values()]
    if store is not None:
        kept = {"fldd": values, "layer": layer, "seeds": list(seeds), "epochs": method.epochs}
        store.put(key, kept | {"epochs_run": runs})
    return Reference(random_mlp_name(len(values), method, runs), tuple(values)), histories
