"""Reference distributions for the illusion checks, measured on the same model, site and task.

Each check's value is judged against what the same check gives for directions whose status is
known:

- random unit directions at the site: the effect (FLDD) that needs no mechanism;
- DAS on norm-matched random MLPs over several seeds (`mlpim.analysis.controls`): the effect DAS
  reaches with no mechanism, and how much it varies from seed to seed;
- the site's directions of natural variation (top principal directions of source-minus-base
  activation differences on the train pairs): directions real prompts do move along, for the
  dormant ratio and nullspace bridging.

`Reference` places a value in such a distribution (percentile, z-score) and gives its spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from mlpim.analysis import controls
from mlpim.analysis import nullspace as ns
from mlpim.engine.interventions import Prepared, evaluate
from mlpim.engine.patching import subspace, work_dtype

NAN = float("nan")


@dataclass(frozen=True)
class Reference:
    """Values one check's statistic takes on directions of known status."""

    name: str
    values: tuple[float, ...] = ()

    def finite(self) -> np.ndarray:
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
        a = self.finite()
        return float(np.quantile(a, q)) if a.size else NAN


@dataclass(frozen=True)
class Refs:
    """The references of one site; a missing one leaves its checks uncalibrated (no spread)."""

    random_dirs: Reference = field(default_factory=lambda: Reference("random directions"))
    random_mlp: Reference = field(default_factory=lambda: Reference("random-MLP DAS"))
    natural_dormant: Reference = field(default_factory=lambda: Reference("natural directions"))
    natural_bridging: Reference = field(default_factory=lambda: Reference("natural directions"))

    @property
    def fldd_spread(self) -> float:
        """Noise scale of a DAS FLDD: the spread over random-MLP seeds, else over random
        directions (NaN when neither was measured)."""
        s = self.random_mlp.spread
        return s if not math.isnan(s) else self.random_dirs.spread


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


def natural_dormant_ratios(
    base: Tensor, source: Tensor, w_out: Tensor, dirs: Float[Tensor, "k m"]
) -> list[float]:
    """The dormant ratio of each natural direction (≈ 1: real prompts move along them)."""
    out = []
    for u in dirs.to(w_out.device, work_dtype(w_out)):
        proj, _ = ns.split(u, w_out)
        out.append(dormant_ratio(base, source, u, proj))
    return out


def direction_fldds(
    model, prepared: list[Prepared], dirs: Float[Tensor, "k m"], desc: str
) -> list[float]:
    """FLDD of patching along each direction (one row of `dirs` at a time)."""
    act = prepared[0].base_act
    dirs = dirs.to(act.device, work_dtype(act))
    bar = tqdm(dirs, desc=desc, leave=False)
    return [evaluate(model, prepared, subspace(u[:, None] / u.norm()))["fldd"] for u in bar]


def bridging_margins(
    model, prepared: list[Prepared], w_out: Tensor, dirs: Tensor, superadditive: float
) -> list[float]:
    """FLDD(u) − superadditive·(FLDD(row part) + FLDD(null part)⁺) for each natural direction."""
    out = []
    for u in tqdm(
        dirs.to(w_out.device, work_dtype(w_out)),
        desc="reference: natural-direction bridging",
        leave=False,
    ):
        proj, null = ns.split(u, w_out)
        f = {n: evaluate(model, prepared, subspace(b))["fldd"]
             for n, b in controls.intervention_bases(u, proj, null).items()}  # fmt: skip
        out.append(
            f["das"] - superadditive * (f.get("row_proj", 0.0) + max(f.get("null_proj", 0.0), 0.0))
        )
    return out


@dataclass(frozen=True)
class RefOptions:
    """How much of each reference to measure (0 skips one)."""

    n_random: int = 32
    n_natural: int = 8
    random_mlp_seeds: int = 3
    random_mlp_epochs: int | None = None
    seed: int = 0


def random_mlp_reference(
    cfg: DictConfig, model, splits: dict[str, list[Prepared]], layer: int, opts: RefOptions,
    run_dir: Path,
) -> tuple[list[dict], Reference]:  # fmt: skip
    """DAS on `opts.random_mlp_seeds` norm-matched random MLPs; their test FLDDs."""
    if opts.random_mlp_seeds <= 0:
        return [], Reference("random-MLP DAS")
    epochs = opts.random_mlp_epochs or cfg.method.epochs
    sub = OmegaConf.merge(cfg, {"method": {"dim": 1, "epochs": epochs}})
    paper = {k: splits[k] for k in ("train", "test")}  # not the held-out generalisation pairs
    aug = controls.augmented_splits(model, paper, layer)
    rows, values = [], []
    seeds = range(opts.seed, opts.seed + opts.random_mlp_seeds)
    for seed in tqdm(seeds, desc=f"reference: random-MLP DAS L{layer}", leave=False):
        new = controls.random_mlp_rows(sub, model, aug, layer, seed, run_dir)
        rows += new
        values += [r["value"] for r in new if r["split"] == "test" and r["metric"] == "fldd"]
    return rows, Reference(f"random-MLP DAS ({len(values)} seeds)", tuple(values))


def site_references(
    model, splits: dict[str, list[Prepared]], kind: str, layer: int, opts: RefOptions,
    superadditive: float,
) -> Refs:  # fmt: skip
    """Random-direction and natural-direction references at (kind, layer) on the test pairs."""
    test, train = splits["test"], splits["train"]
    m = test[0].base_act.shape[-1]
    dirs = random_unit_directions(m, opts.n_random, opts.seed)
    rand = direction_fldds(model, test, dirs, f"reference: {opts.n_random} random directions")
    refs = Refs(random_dirs=Reference(f"random directions (n={len(rand)})", tuple(rand)))
    if kind != "mlp_post" or opts.n_natural <= 0:
        return refs
    w_out = ns.mlp_w_out(model, layer)
    base, source = (torch.cat([getattr(p, a) for p in train]) for a in ("base_act", "source_act"))
    nat = natural_directions(base, source, opts.n_natural)
    tb, ts = (torch.cat([getattr(p, a) for p in test]) for a in ("base_act", "source_act"))
    name = f"natural directions (n={nat.shape[0]})"
    dormant = Reference(name, tuple(natural_dormant_ratios(tb, ts, w_out, nat)))
    bridging = Reference(name, tuple(bridging_margins(model, test, w_out, nat, superadditive)))
    return Refs(refs.random_dirs, refs.random_mlp, dormant, bridging)
