"""illusion_benchmark's case families at one MLP layer (docs/verdict-rule.md, "The planted cases").

- **pathway** (illusory by construction): a hidden direction d real prompts do not move
  (`planted.low_moment_direction`) is made to write along t by the edit W_out += β d ⊗ t̂; the
  illusion mixes d with a nullspace part n of the edited W_out that moves with the variable.
- **mixing** (illusory by construction; the second family, the construction of 2026-12-01): the
  nullspace part of the variable direction mixed with the minimum-variance preimage of t.
- **edit** (real by construction): a rank-1 edit W_out += α u ⊗ t̂ makes a centred direction u
  that moves with the variable write it along t; u and its read part r are the mechanism.
- **hard negative**: c·r + s·n in that edited model, n a nullspace part uncorrelated with the
  variable, or correlated with it; **Wu control**: the variable direction itself (Wu et al.
  2024's intuitive explanation); **unedited**: the variable direction and its read part in the
  model as it is. Their truth is the principle's (`planted.principle_truth`), fixed before scoring.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlpim.analysis import measure as M
from mlpim.analysis import nullspace as ns
from mlpim.analysis import planted
from mlpim.analysis import references as R
from mlpim.analysis.benchmark import (
    Layer,
    LayerResult,
    clean_ld,
    in_edit,
    measured_case,
    pair_writes,
    refused_row,
    resid_cases,
    trained_v_resid,
)
from mlpim.analysis.mlp_write import residual_jacobian
from mlpim.engine.das import DasSettings
from mlpim.engine.interventions import prepare

DORMANT_PCT = 5.0  # a dormant direction's held-out variance percentile must lie below this
N_RANDOM_PCT = 1000  # random hidden directions behind a percentile


def pct(ctx: Layer, v: Tensor) -> float:
    """v's held-out variance percentile among random hidden directions (nan for v = 0)."""
    if v.norm() < 1e-9:
        return float("nan")
    return planted.hidden_percentile(ctx.held_out, v, N_RANDOM_PCT, ctx.opts.seed)


def row_pct(ctx: Layer, site: M.SiteData, v: Tensor) -> float:
    """The held-out variance percentile of v's read (row-space) part at `site`."""
    return pct(ctx, ns.split(v.double(), site.w_out)[0].double())


def movement(ctx: Layer, site: M.SiteData, v: Tensor) -> dict[str, float]:
    """How a patch along v moves its read part, on the train pairs (`planted.read_movement`)."""
    moved = planted.differences(site.splits["train"])
    return planted.read_movement(v, site.w_out, moved, torch.sign(ctx.drive))


def case(ctx: Layer, site: M.SiteData, name: str, v: Tensor, truth: str, **extra):
    """(rows, case rows) of one planted direction with its read movement and the principle's
    truth beside the constructed one."""
    move = movement(ctx, site, v)
    extra = move | {"principle": planted.principle_truth(move["m"])} | extra
    return measured_case(ctx.model, site, name, v, truth, **extra)


def principled(ctx: Layer, site: M.SiteData, name: str, v: Tensor, kind: str, **extra):
    """(rows, case rows) of a case whose truth is the principle's."""
    truth = planted.principle_truth(movement(ctx, site, v)["m"])
    return case(ctx, site, name, v, truth, kind=kind, **extra)


def joined(parts) -> tuple[list, list]:
    """(rows, cases) of several (rows, cases) parts."""
    rows, cases = [], []
    for r, c in parts:
        rows, cases = rows + r, cases + c
    return rows, cases


# ---------------------------------------------------------------- illusions


def mixing_cases(ctx: Layer) -> tuple[list, list]:
    """Today's construction: the variable's nullspace part mixed with t's min-variance preimage."""
    site, opts = ctx.site, ctx.opts
    moved = planted.differences(site.splits["train"])
    irr = planted.unit_null_part(planted.variable_direction(site.splits["train"]), site.w_out)
    irr = planted.oriented_by(irr, moved, ctx.drive).to(site.w_out)
    cov = planted.covariance(ctx.natural_train, opts.natural_ridge)
    dor = planted.min_variance_preimage(site.w_resid, cov, ctx.target.to(site.w_out)).to(site.w_out)
    props = {"kind": "mixing", "d_pct": pct(ctx, dor)}
    cases = []
    for a in opts.mixing_angles:
        v = planted.mix(irr, dor, a)
        extra = props | {"angle": a, "row_pct": row_pct(ctx, site, v)}
        cases.append(case(ctx, site, f"illusory mixing {a:g}°", v, "illusory", **extra))
    return joined(cases)


def pathway_cases(ctx: Layer) -> tuple[list, list]:
    """Dormant-pathway illusions: per strength one edit β d ⊗ t̂, per angle one mix of n and d."""
    site, opts = ctx.site, ctx.opts
    d = planted.low_moment_direction(ctx.natural_train, site.w_out, opts.dormant_extra)
    d_pct, n_cases = pct(ctx, d), len(opts.pathway_angles)
    if not d_pct < DORMANT_PCT:
        why = f"no dormant direction: d's held-out variance percentile {d_pct:.1f}"
        return [], [refused_row("pathway", "pathway", ctx.layer, math.nan, 0) | {"reason": why}]
    moved = planted.differences(site.splits["train"])
    n = planted.unit_null_part(planted.variable_direction(site.splits["train"]), site.w_out, d)
    n = planted.oriented_by(n, moved, ctx.drive)
    parts = []
    for s in tqdm(opts.pathway_strengths, desc=f"dormant pathways L{ctx.layer}", leave=False):
        beta = planted.pathway_beta(moved @ n, ctx.gap, s)
        delta = planted.edit_delta(d, ctx.target, beta, ctx.jac)
        name = f"pathway ×{s:g}"
        props = {"kind": "pathway", "strength": s, "beta": beta, "d_pct": d_pct}
        each = lambda es, name=name, props=props: pathway_angles(ctx, es, n, d, name, props)  # noqa: E731
        parts.append(in_edit(ctx, delta, name, "pathway", n_cases, each))
    return joined(parts)


def pathway_angles(ctx: Layer, site: M.SiteData, n: Tensor, d: Tensor, name: str, props: dict):
    """The pathway illusions of one edited model, one per angle, and hidden in k-dim subspaces."""
    parts = []
    for a in ctx.opts.pathway_angles:
        v = planted.mix(n, d, a)
        extra = props | {"angle": a, "row_pct": row_pct(ctx, site, v)}
        parts.append(case(ctx, site, f"illusory {name} {a:g}°", v, "illusory", **extra))
    hidden = planted.mix(n, d, 45.0)
    for k in ctx.opts.bench_k:
        basis = planted.hidden_in_subspace(hidden, site.w_out, k, ctx.opts.seed + k, (n, d))
        name_k = f"illusory {name} 45° in a {k}-dim subspace"
        parts.append(kdim_case(ctx, site, name_k, basis, "illusory", "k-dim pathway"))
    return joined(parts)


def kdim_case(ctx: Layer, site: M.SiteData, name: str, basis: Tensor, truth: str, kind: str):
    """(rows, case rows) of a k-dim subspace, its effect gated by random k-dim subspaces."""
    k, opts = basis.shape[1], ctx.opts
    rand = R.random_direction_reference(
        ctx.model, site.splits["test"], opts.n_random_directions, opts.seed, k=k
    )
    at_k = replace(site, refs=replace(site.refs, random_dirs=rand))
    return measured_case(ctx.model, at_k, name, basis, truth, kind=kind, k=k)


# ---------------------------------------------------------------- real directions


def unedited_cases(ctx: Layer) -> tuple[list, list]:
    """The variable direction and its read part in the model as it is (truth: the principle)."""
    site = ctx.site
    var = planted.variable_direction(site.splits["train"])
    row = ns.split(var.double(), site.w_out)[0]
    return joined(
        principled(ctx, site, name, v, "unedited")
        for name, v in (("unedited variable direction", var), ("unedited read part", row))
    )


def read_direction(ctx: Layer, rank: int) -> Tensor | None:
    """The rank-th natural direction of the train differences, centred and oriented along the
    residual's movement; None where the site does not vary that much."""
    train = ctx.site.splits["train"]
    top = R.natural_directions(*M.acts(train), rank + 1)
    if len(top) <= rank:
        return None
    u = planted.centred(top[rank].double(), ctx.natural_train.double().mean(0))
    return planted.oriented_by(u, planted.differences(train), ctx.drive)


def edit_cases(ctx: Layer) -> tuple[list, list]:
    """Per read direction and strength, one real edit and its hard negatives and Wu control."""
    opts, parts = ctx.opts, []
    n_cases = 3 + 3 * len(opts.null_norms) + len(opts.bench_k)
    for rank in opts.edits:
        u = read_direction(ctx, rank)
        if u is None:
            continue
        for s in opts.edit_strengths:
            alpha = planted.edit_alpha(ctx.site.splits["train"], u, ctx.gap, s)
            delta = planted.edit_delta(u, ctx.target, alpha, ctx.jac)
            name = f"edit (natural {rank}, ×{s:g})"
            each = lambda es, name=name, u=u: real_family(ctx, es, u, name)  # noqa: E731
            parts.append(in_edit(ctx, delta, name, "edit", n_cases, each))
    return joined(parts)


def real_family(ctx: Layer, site: M.SiteData, u: Tensor, name: str) -> tuple[list, list]:
    """In one edited model: u, its read part r, c·r + s·n per null kind and norm, the variable
    direction (Wu control)."""
    moved = planted.differences(site.splits["train"])
    r = ns.split(u.double(), site.w_out)[0].double()
    r = r / r.norm()
    parts = [
        case(ctx, site, f"real {name}", u, "real", kind="edit"),
        case(ctx, site, f"real {name} read part", r, "real", kind="edit"),
    ]
    for null_kind, n in null_parts(ctx, site, moved, r).items():
        for sq in ctx.opts.null_norms:
            v = math.sqrt(1 - sq) * r + math.sqrt(sq) * n
            title = f"{name} + {null_kind} null ‖n‖²={sq:g}"
            parts.append(principled(ctx, site, title, v, "hard negative", null_kind=null_kind))
    var = planted.variable_direction(site.splits["train"])
    parts.append(principled(ctx, site, f"{name} variable direction", var, "Wu control"))
    for k in ctx.opts.bench_k:
        basis = planted.real_subspace(u, site.splits["train"], k)
        parts.append(
            kdim_case(ctx, site, f"real {name} in a {k}-dim subspace", basis, "real", "k-dim edit")
        )
    return joined(parts)


def null_parts(ctx: Layer, site: M.SiteData, moved: Tensor, r: Tensor) -> dict[str, Tensor]:
    """Unit nullspace directions of the edited W_out: uncorrelated with r's movement, the
    variable direction's nullspace part (oriented to move with r), and the one that moves most
    along the variable (`planted.aligned_null_direction`: the largest ρ a null part can have)."""
    dr = moved @ r
    corr = planted.unit_null_part(planted.variable_direction(site.splits["train"]), site.w_out)
    corr = planted.oriented_by(corr, moved, dr)
    top = planted.aligned_null_direction(moved, site.w_out, torch.sign(ctx.drive))
    rand = planted.random_null_direction(site.w_out, ctx.opts.seed + ctx.layer)
    return {
        "uncorrelated": planted.decorrelated(rand, corr, moved, r),
        "correlated": corr,
        "aligned": top,
    }


FAMILIES = (mixing_cases, pathway_cases, unedited_cases, edit_cases)


# ---------------------------------------------------------------- one layer


def layer_result(
    model,
    batches: dict[str, list],
    layer: int,
    site_of,
    naturals: tuple[Tensor, Tensor],
    method: DasSettings,
    engine: str,
    opts,
) -> LayerResult:
    """Every case at one MLP and its resid_post; `site_of(mlp splits)` gives the unedited MLP
    site and its random-MLP histories; naturals = (train, held-out) hidden activations."""
    resid = {k: prepare(model, b, "resid_post", layer, engine) for k, b in batches.items()}
    v_resid, hist = trained_v_resid(model, resid, method, opts.seed)
    out = LayerResult(v_resid=v_resid)
    out.rows.append(train_loss_row(layer, hist))
    mlp = {k: prepare(model, b, "mlp_post", layer, engine) for k, b in batches.items()}
    site, out.histories = site_of(mlp)
    drive = planted.differences(resid["train"]) @ v_resid
    ctx = Layer(
        model,
        layer,
        batches,
        site,
        v_resid,
        float(drive.abs().mean()),
        drive,
        clean_ld(site),
        naturals[0],
        naturals[1],
        opts,
        engine,
        residual_jacobian(model, layer, [p.pairs.base for p in mlp["train"][:2]]),
        pair_writes(model, layer, batches["train"]),
    )
    for family in FAMILIES:
        out.add(family(ctx))
    out.add(resid_cases(model, resid, layer, v_resid, site.th, opts))
    return out


def train_loss_row(layer: int, hist) -> dict:
    """v_resid's last train loss as a metric row."""
    return {
        "intervention": "v_resid",
        "site": "resid_post",
        "layer": layer,
        "split": "train",
        "metric": "train_loss",
        "value": hist.train_loss.iloc[-1],
    }
