"""Several sites prepared from one run per batch, the nullspace share of an MLP subspace, and
one site of ioi_layer_profile (`profile_site`: DAS, then the rows of a single-layer run).

`prepare_many` is `interventions.prepare` for many sites at once: each batch's base and source
prompts run once (per engine: every site kind of a layer profile resolves to the same one), the
site activations and engine states of all sites are cut from that run, and the first batch of
every site passes the runtime guard. Kernel states of different sites hold the same cached keys
and values for the blocks they share; `share_prefixes` makes them one tensor each, so memory
grows with the batches, not with batches × sites.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mlpim.analysis import nullspace as ns
from mlpim.analysis.rows import metric_rows
from mlpim.engine import fastpath
from mlpim.engine.batch import PairBatch
from mlpim.engine.das import DasSettings, train_das
from mlpim.engine.interventions import (
    Prepared,
    Site,
    choose_engine,
    clean_metrics,
    evaluate,
    guard,
    prepare_sites,
)
from mlpim.engine.patching import full, subspace


def share_prefixes(preps: Iterable[Prepared]) -> None:
    """Let one batch's sites share their (equal) per-block kernel keys and values, and copy the
    END rows they keep out of the full-length tensors they are views of (the clean logits are a
    view of the [b, seq, vocab] logits: 100 MB a batch on SmolLM2)."""
    keys: dict[int, Tensor] = {}
    values: dict[int, Tensor] = {}
    logits: dict[int, Tensor] = {}
    for p in preps:
        if id(p.clean_logits) not in logits:
            logits[id(p.clean_logits)] = p.clean_logits.clone()
        p.clean_logits = logits[id(p.clean_logits)]
        st = p.state
        if not isinstance(st, fastpath.EndState):
            continue
        st.keys = {i: keys.setdefault(i, t) for i, t in st.keys.items()}
        st.values = {i: values.setdefault(i, t) for i, t in st.values.items()}
        st.resid_pre, st.resid_mid = st.resid_pre.clone(), st.resid_mid.clone()


def prepare_many(
    model, batches: list[PairBatch], sites: list[Site], engine: str = "auto"
) -> dict[Site, list[Prepared]]:
    """Every batch prepared at every site from one base and one source run per batch (and engine);
    the first batch of each site is checked with `guard`."""
    by_engine: dict[str, list[Site]] = {}
    for site in sites:
        by_engine.setdefault(choose_engine(model, engine, batches, site[0]), []).append(site)
    out: dict[Site, list[Prepared]] = {site: [] for site in sites}
    bar = tqdm(batches, desc=f"prepare {len(sites)} sites", leave=False, disable=len(batches) < 4)
    for pb in bar:
        for chosen, group in by_engine.items():
            preps = prepare_sites(model, pb, group, chosen)
            share_prefixes(preps.values())
            for site, p in preps.items():
                out[site].append(p)
    for prepared in out.values():
        if prepared:
            guard(model, prepared[0])
    return out


def null_fraction(basis: Float[Tensor, "m k"], w_out: Float[Tensor, "m d"]) -> tuple[float, float]:
    """(share of the basis's squared norm in W_out's nullspace, the same share expected of a
    random subspace: 1 - rank(W_out) / m). k = 1: ‖null part of v‖² / ‖v‖²."""
    q = ns.row_space_basis(w_out).double()
    b = basis.double().to(q.device)
    null = b - q @ (q.T @ b)
    frac = (null.norm() ** 2 / b.norm() ** 2).item()
    return frac, 1.0 - q.shape[1] / w_out.shape[0]


def profile_site(
    model,
    kind: str,
    layer: int,
    splits: dict[str, list[Prepared]],
    method: DasSettings,
    seed: int,
) -> tuple[list[dict], Tensor, dict[str, float], pd.DataFrame]:
    """DAS at one site, then the rows of a single-layer subspace run (the clean, full and DAS
    metrics per split, and v_MLP's nullspace share at mlp_post). Returns (rows, the basis, its
    test metrics, the DAS history)."""
    rot, hist = train_das(model, splits["train"], splits["test"], method, seed)
    basis = rot.basis.detach()
    keys = {"site": kind, "layer": layer, "dim": method.dim, "seed": seed}
    rows, found = [], {}
    for split, prepared in splits.items():
        rows += metric_rows(clean_metrics(prepared), intervention="clean", split=split, **keys)
        das = subspace(basis.to(prepared[0].base_act.device))
        for name, setter in (("full", full), ("das", das)):
            found[split, name] = evaluate(model, prepared, setter)
            rows += metric_rows(found[split, name], intervention=name, split=split, **keys)
    if kind == "mlp_post":
        frac, chance = null_fraction(basis, ns.mlp_w_out(model, layer))
        values = {"null_frac": frac, "null_frac_random": chance}
        rows += metric_rows(values, intervention="das", split="train", **keys)
    return rows, basis, found["test", "das"], hist
