"""Measure every illusion check on one direction, or one k-dim subspace, at a prepared site.

`SiteData` holds what is measured once per site and shared by every direction checked there: the
prepared pairs, the whole-site patch, the references, the natural activations and the bootstrap
resampling of each pair set (templates, then pairs inside them: `stats.resample`) and of the
natural sample. `measure_checks` patches V (an orthonormal m×k basis; k = 1 a unit
direction v) and its row-space and nullspace parts (each orthonormalised) on the test pairs, runs
the checks (`mlpim.analysis.checks`, one module each) and returns tidy metric rows with them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mlpim import reuse
from mlpim.analysis import divergence
from mlpim.analysis import nullspace as ns
from mlpim.analysis import references as R
from mlpim.analysis.checks import BRIDGING, DORMANT, Thresholds
from mlpim.analysis.checks.alignment import alignment_check
from mlpim.analysis.checks.base import Check, not_applicable
from mlpim.analysis.checks.component_vs_subspace import component_check
from mlpim.analysis.checks.dormant_row_part import dormant_check
from mlpim.analysis.checks.effect import effect_check
from mlpim.analysis.checks.generalisation import generalisation_check
from mlpim.analysis.checks.nullspace_bridging import bridging_margin, nullspace_check
from mlpim.analysis.checks.off_distribution import net_off, off_distribution_check
from mlpim.analysis.checks.random_mlp import random_mlp_check
from mlpim.analysis.mlp_write import residual_w_out
from mlpim.analysis.rows import metric_rows
from mlpim.analysis.stats import Est, fldd_est, mean_est, resample
from mlpim.engine.interventions import Prepared, leads, patched_end_lds
from mlpim.engine.models import hook_name
from mlpim.engine.patching import at, full, subspace

Splits = dict[str, list[Prepared]]
HELD_OUT = ("new templates", "new names")  # held-out sets beyond the test pairs (IOI)
NATURAL_PARTS = 3  # interventions per natural direction for the bridging reference
NATURAL_SEED = 7919  # added to the seed for the natural sample's resampling (not a pair set's)


@dataclass(frozen=True)
class PairLDs:
    """Patched and clean logit differences, one per pair."""

    ld: Float[Tensor, " n"]
    clean: Float[Tensor, " n"]

    def fldd(self, idx: np.ndarray) -> Est:
        """FLDD with its bootstrap over the pairs."""
        return fldd_est(self.ld, self.clean, idx)


def pair_lds(model, prepared: list[Prepared], setter, changing: bool = False) -> PairLDs:
    """Per pair, patched and clean LD (`changing`: only pairs whose answer the patch changes)."""
    lds, clean = [], []
    with torch.no_grad():
        for p in prepared:
            keep = p.pairs.label != p.pairs.base.answer if changing else slice(None)
            lds.append(patched_end_lds(model, p, setter)[keep])
            clean.append(p.clean_ld[keep])
    return PairLDs(torch.cat(lds), torch.cat(clean))


def acts(prepared: list[Prepared]) -> tuple[Tensor, Tensor]:
    """Base and source site activations over all pairs."""
    return torch.cat([p.base_act for p in prepared]), torch.cat([p.source_act for p in prepared])


@dataclass
class SiteData:
    """What one site's checks share: pairs, whole-site patch, references, resampling."""

    kind: str
    layer: int
    splits: Splits
    th: Thresholds
    refs: R.Refs
    idx: dict[str, np.ndarray]  # bootstrap indices per split (and "train (changing)")
    full: PairLDs  # the whole-site patch on the test pairs
    w_out: Tensor | None = None  # the MLP's W_out (mlp_post), read when the site is measured
    w_resid: Tensor | None = None  # W_out as the residual sees it (`mlp_write.residual_w_out`)
    natural: Tensor | None = None  # natural site activations over many prompts (mlp_post)
    natural_idx: np.ndarray | None = None  # the natural sample's bootstrap, n_boot × its size
    random_mlp: Est | None = None  # mean test FLDD of random-MLP DAS over seeds


def clusters(prepared: list[Prepared], changing: bool = False) -> list:
    """Each pair's cluster id (`PairBatch.cluster`; None: its own), over the batches in order
    (`changing`: only pairs whose answer the patch changes)."""
    out = []
    for p in prepared:
        ids = p.pairs.cluster or (None,) * len(p.pairs)
        keep = (p.pairs.label != p.pairs.base.answer).tolist() if changing else [True] * len(ids)
        out += [c for c, k in zip(ids, keep, strict=True) if k]
    return out


def bootstrap_indices(splits: Splits, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """One cluster resampling per pair set (the changing train pairs apart), each seeded
    differently (`stats.resample`)."""
    ids = {k: clusters(v) for k, v in splits.items()}
    ids["train (changing)"] = clusters(splits.get("train", []), changing=True)
    return {
        k: resample(len(c), n_boot, seed + i, c)
        for i, (k, c) in enumerate(sorted(ids.items()))
        if c
    }


def site_data(
    model,
    splits: Splits,
    kind: str,
    layer: int,
    th: Thresholds,
    refs: R.Refs,
    natural: Tensor | None = None,
    random_mlp: list[float] | None = None,
    seed: int = 0,
) -> SiteData:
    """The shared part of a site's checks (the whole-site patch measured here); at mlp_post,
    W_out as the residual sees it, after checking that the MLP writes hidden @ W_out."""
    rand = mean_est(np.asarray(random_mlp), th.n_boot, seed) if random_mlp else None
    w_out = ns.mlp_w_out(model, layer).clone() if kind == "mlp_post" else None
    bases = [p.pairs.base for p in splits["train"][:2]]  # enough to check and average the write
    w_resid = residual_w_out(model, layer, bases).clone() if kind == "mlp_post" else None
    nat_idx = None if natural is None else resample(len(natural), th.n_boot, seed + NATURAL_SEED)
    return SiteData(
        kind=kind,
        layer=layer,
        splits=splits,
        th=th,
        refs=refs,
        idx=bootstrap_indices(splits, th.n_boot, seed),
        full=pair_lds(model, splits["test"], full),
        w_out=w_out,
        w_resid=w_resid,
        natural=natural,
        natural_idx=nat_idx,
        random_mlp=rand,
    )


def fldd_rows(fl: dict[str, Est], split: str, keys: dict, level: float) -> list[dict]:
    """FLDD and its interval per intervention."""
    rows = []
    for name, e in fl.items():
        lo, hi = e.ci(level)
        rows += metric_rows(
            {"fldd": e.value, "fldd_low": lo, "fldd_high": hi},
            intervention=name,
            split=split,
            **keys,
        )
    return rows


def generalisation(model, site: SiteData, v: Float[Tensor, "m k"], fldd_test: Est, keys: dict):
    """Check 'generalisation': V on the changing train pairs vs each held-out set."""
    setter = subspace(ns.unit_basis(*v.T))
    train = pair_lds(model, site.splits["train"], setter, changing=True)
    held = {"test": fldd_test}
    for k in HELD_OUT:
        if k in site.splits:
            held[k] = pair_lds(model, site.splits[k], setter).fldd(site.idx[k])
    fl = {"train (changing)": train.fldd(site.idx["train (changing)"]), **held}
    rows = []
    for k, e in fl.items():
        if k != "test":
            rows += fldd_rows({"das": e}, k, keys, site.th.ci_level)
    return rows, generalisation_check(fl["train (changing)"], held, site.th)


def part_bases(v: Float[Tensor, "m k"], proj: Tensor, null: Tensor) -> dict[str, Tensor]:
    """Orthonormal bases to patch: V, and its row-space and nullspace parts where they do not
    vanish (`nullspace.part_basis`; k = 1: each part normalised, left out below norm 1e-6)."""
    parts = {"row_proj": ns.part_basis(proj), "null_proj": ns.part_basis(null)}
    return {"das": ns.unit_basis(*v.T)} | {k: b for k, b in parts.items() if b is not None}


def part_fldds(
    model, site: SiteData, v: Float[Tensor, "m k"]
) -> tuple[dict[str, Est], Tensor, Tensor]:
    """FLDD of V and of its W_out row-space and nullspace parts on the test pairs; the parts."""
    proj, null = ns.split(v, site.w_out)
    bases = part_bases(v, proj, null)
    test, idx = site.splits["test"], site.idx["test"]
    fl = {k: pair_lds(model, test, subspace(b)).fldd(idx) for k, b in bases.items()}
    return fl, proj, null


def off_distances(site: SiteData, v: Tensor) -> tuple[Est, Est]:
    """The off-distribution distance of the patch along V and of the whole-site patch on the
    test pairs, read along what V writes into the residual (`SiteData.w_resid`)."""
    base, source = acts(site.splits["test"])
    return divergence.off_distribution(
        base, source, v, site.w_resid, site.natural, site.idx["test"], site.natural_idx
    )


def mlp_direction_checks(
    site: SiteData, v: Tensor, fl: dict[str, Est], proj, null, keys: dict
) -> tuple[list[dict], list[Check]]:
    """Nullspace bridging, dormant row part and off-distribution at an MLP hidden site; the raw
    off-distribution distances of V and of the whole-site patch as metric rows."""
    base, source = acts(site.splits["test"])
    idx, th, refs, k = site.idx["test"], site.th, site.refs, v.shape[1]
    row = fl.get("row_proj", Est(0.0, np.zeros(len(idx))))
    off, full_off = off_distances(site, v)
    rows = []
    for name, e in {"das": off, "full": full_off}.items():
        lo, hi = e.ci(th.ci_level)
        values = {"off_distance": e.value, "off_distance_low": lo, "off_distance_high": hi}
        rows += metric_rows(values, intervention=name, split="test", **keys)
    checks = [
        nullspace_check(fl["das"], row, null.norm().item() ** 2 / k, refs, th),
        dormant_check(divergence.dormant_est(base, source, v, proj, idx), refs, th, k),
        off_distribution_check(off, full_off, refs, th, k),
    ]
    return rows, checks


def site_checks(site: SiteData, fldd_v: Est) -> list[Check]:
    """The site checks: whole-site patch, random-MLP DAS (n.a. when not measured)."""
    comp = component_check(fldd_v, site.full.fldd(site.idx["test"]), site.th)
    if site.random_mlp is None:
        why = "no random-MLP DAS reference (only at mlp_post; random_mlp_seeds=0 skips it)"
        return [comp, not_applicable("random_mlp", why)]
    return [comp, random_mlp_check(site.random_mlp, fldd_v, site.refs, site.th)]


def measure_checks(
    model,
    site: SiteData,
    v: Float[Tensor, "m k"],
    keys: dict,
    v_ref: Tensor | None = None,
    n_align: int = 1000,
) -> tuple[list[dict], list[Check]]:
    """Every check on the subspace of orthonormal V (k = 1: unit v) at the site (`checks.CHECKS`
    order) and its metric rows; a part's norm_sq is its share of V, ‖part‖²_F / k."""
    level, test_idx, k = site.th.ci_level, site.idx["test"], v.shape[1]
    if site.kind == "mlp_post":
        fl, proj, null = part_fldds(model, site, v)
        off_rows, direction = mlp_direction_checks(site, v, fl, proj, null, keys)
        align = alignment(v, site.w_resid, v_ref, n_align, keys.get("seed", 0))
        norms = {"row_proj": proj.norm().item() ** 2 / k, "null_proj": null.norm().item() ** 2 / k}
    else:
        setter = subspace(ns.unit_basis(*v.T))
        fl = {"das": pair_lds(model, site.splits["test"], setter).fldd(test_idx)}
        why = f"needs an MLP hidden site (mlp_post), not {site.kind}"
        names = (*BRIDGING, *DORMANT)
        direction = [not_applicable(n, why) for n in names]
        align, norms, off_rows = not_applicable("alignment", why), {}, []
    rows = fldd_rows({"full": site.full.fldd(test_idx), **fl}, "test", keys, level) + off_rows
    for name, sq in norms.items():
        rows += metric_rows({"norm_sq": sq}, intervention=name, split="test", **keys)
    g_rows, gen = generalisation(model, site, v, fl["das"], keys)
    comp, rand = site_checks(site, fl["das"])
    effect = effect_check(fl["das"], site.refs, site.th)
    checks = [effect, comp, *direction, align, rand, gen]
    return rows + g_rows, checks


def alignment(v: Tensor, w_out: Tensor, v_ref: Tensor | None, n: int, seed: int):
    """The alignment row against the reference residual direction, if there is one."""
    if v_ref is None:
        return not_applicable("alignment", "no reference residual direction given")
    return alignment_check(v, w_out, v_ref, n, seed)


# ---------------------------------------------------------------- natural-direction references


def natural_references(model, site: SiteData, k: int) -> R.Refs:
    """The site's references plus the natural directions' dormant, bridging and off values."""
    if site.kind != "mlp_post" or k <= 0:
        return site.refs
    key = lambda: (*site_key(model, site), k)  # noqa: E731
    return replace(site.refs, **reuse.memo("natural_refs", key, lambda: _natural(model, site, k)))


def _natural(model, site: SiteData, k: int) -> dict[str, R.Reference]:
    nat = R.natural_directions(*acts(site.splits["train"]), k).to(site.w_out)
    base, source = acts(site.splits["test"])
    idx, th = site.idx["test"], site.th
    dormant, bridging, off = [], [], []
    for u in tqdm(nat[:, :, None], desc="reference: natural directions", leave=False):
        fl, proj, _ = part_fldds(model, site, u)
        row = fl["row_proj"].value if "row_proj" in fl else 0.0
        bridging.append(bridging_margin(fl["das"].value, row, th.superadditive))
        dormant.append(divergence.dormant_est(base, source, u, proj, idx).value)
        off.append(net_off(*off_distances(site, u)).value)
    name = f"natural directions (n={nat.shape[0]})"
    ref = lambda xs: R.Reference(name, tuple(xs))  # noqa: E731
    return {
        "natural_dormant": ref(dormant),
        "natural_bridging": ref(bridging),
        "natural_off": ref(off),
    }


def site_key(model, site: SiteData) -> tuple:
    """What a site's references depend on: weights, pairs, site, engine, natural sample,
    resampling and thresholds (everything else is computed from these)."""
    first = next(iter(site.splits.values()))[0]
    pairs = {s: [p.pairs for p in ps] for s, ps in site.splits.items()}
    sample = reuse.digest(pairs, site.natural, site.idx, site.natural_idx, site.th)
    return (*reuse.model_key(model), sample, first.name, first.engine)


# ---------------------------------------------------------------- natural activations


class _Stop(Exception):
    """Ends a forward pass once the last needed layer is read."""


def _reader(out: list, pos: Tensor, stop: bool):
    def read(act: Tensor, hook=None) -> None:
        out.append(at(act, pos).detach())
        if stop:
            raise _Stop

    return read


def natural_acts(model, batches: list, kind: str, layers: list[int]) -> dict[int, Tensor]:
    """Per layer, the site's activations at each prompt's END over prompt batches (no grad)."""
    key = lambda: (*reuse.model_key(model), reuse.digest(batches), kind, tuple(layers))  # noqa: E731
    compute = lambda: _natural_acts(model, batches, kind, layers)  # noqa: E731
    verify = lambda kept: natural_agrees(model, batches, kind, kept)  # noqa: E731
    kept = reuse.memo("natural", key, compute, verify=verify)
    return {L: t.clone() for L, t in kept.items()}


def natural_agrees(model, batches: list, kind: str, kept: dict[int, Tensor], rows: int = 4) -> bool:
    """Whether natural activations read from disk are what this model computes: the first
    batch's first `rows` prompts read again agree within `tolerance`."""
    fresh = _natural_acts(model, [batches[0].head(rows)], kind, sorted(kept))
    return all(leads(fresh[L], kept[L]) for L in kept)


def _natural_acts(model, batches: list, kind: str, layers: list[int]) -> dict[int, Tensor]:
    names = {hook_name(kind, L): L for L in layers}
    last = max(layers)
    out: dict[int, list[Tensor]] = {L: [] for L in layers}
    for b in tqdm(batches, desc=f"natural {kind} activations", leave=False):
        b = b.to(model.cfg.device)
        hooks = [(n, _reader(out[L], b.pos, L == last)) for n, L in names.items()]
        try:
            with torch.no_grad():
                model.run_with_hooks(b.tokens, attention_mask=b.mask, fwd_hooks=hooks)
        except _Stop:
            pass
    return {L: torch.cat(v) for L, v in out.items()}
