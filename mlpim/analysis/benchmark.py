"""illusion_benchmark's engine room: one layer's sites, edited models and measured cases.

Per MLP layer, on any task: the residual circuit direction t (1-D DAS at resid_post of the same
layer), the unedited MLP site with its references, then the case families of
`mlpim.analysis.bench_cases`, each checked with the thresholds as set. A case planted in an
edited model is prepared, referenced and checked in that model; an edit that breaks the task
(clean logit difference below `min_clean_ratio` × the unedited model's) is refused and counted,
never scored. Nothing here writes files: the runner saves what `LayerResult` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import illusion, planted
from mlpim.analysis import measure as M
from mlpim.analysis import references as R
from mlpim.analysis.bench_table import gate_position
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.editing import edited_w_out
from mlpim.analysis.mlp_write import end_outputs
from mlpim.analysis.toy_cases import toy_cases, toy_checks
from mlpim.engine.das import DasSettings, train_das
from mlpim.engine.interventions import prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchOptions:
    """What the benchmark plants and measures (config `extra.*`)."""

    mixing_angles: tuple[float, ...]  # today's mixing construction (second family of illusions)
    pathway_strengths: tuple[float, ...]  # dormant-pathway edits: × the residual's own gap
    pathway_angles: tuple[float, ...]  # mixing angle of the varying null part and dormant d
    edits: tuple[int, ...]  # natural-direction ranks read by the real rank-1 edits
    edit_strengths: tuple[float, ...]  # each real edit writes this × the residual's gap
    null_norms: tuple[float, ...]  # ‖n‖² of the hard negatives c·r + s·n
    n_random_directions: int
    n_natural: int
    random_mlp_seeds: int
    natural_ridge: float
    seed: int
    dormant_extra: int = 32  # a dormant d is sought among d_model + this least-moment neurons
    min_clean_ratio: float = 0.5  # refuse an edit whose clean LD falls below this × unedited
    bench_k: tuple[int, ...] = ()  # dimensions of the planted k-dim subspaces (issue 31)


@dataclass
class LayerResult:
    """One layer's metric rows, case rows, t (v_resid) and the random-MLP training histories."""

    rows: list[dict] = field(default_factory=list)
    cases: list[dict] = field(default_factory=list)
    v_resid: Tensor | None = None
    histories: dict[int, pd.DataFrame] = field(default_factory=dict)

    def add(self, part: tuple[list[dict], list[dict]]) -> None:
        """Append (metric rows, case rows)."""
        self.rows, self.cases = self.rows + part[0], self.cases + part[1]


@dataclass
class Layer:
    """What every case family at one layer shares."""

    model: object
    layer: int
    pairs: dict[str, list]  # unprepared pair batches per split (re-prepared in edited models)
    site: M.SiteData  # the unedited MLP site
    target: Tensor  # t: the residual circuit direction (unit)
    gap: float  # mean |Δ(resid·t)| over the train pairs
    drive: Tensor  # Δ(resid·t) per train pair: the residual's own movement along t
    clean: float  # the unedited model's mean clean LD on the test pairs
    natural_train: Tensor  # natural hidden activations of train prompts (choosing d, covariance)
    held_out: Tensor  # natural hidden activations of held-out prompts (dormancy percentiles)
    opts: BenchOptions
    engine: str
    jac: Tensor | None  # the block's post-MLP norm's mean Jacobian (None: no such norm)
    writes: Tensor  # the unedited block's source − base write per train pair (`pair_writes`)


def pair_writes(model, layer: int, pairs: list) -> Float[Tensor, "n d"]:
    """What block `layer` adds to the residual at each pair's source minus at its base (float64)."""
    base = end_outputs(model, layer, [p.base for p in pairs])[2]
    return end_outputs(model, layer, [p.source for p in pairs])[2].double() - base.double()


def edit_write(ctx: Layer) -> float:
    """What the edit in place adds along t between source and base, over the train pairs,
    measured through the model in units of the residual's gap (a real edit: its strength, to
    first order; a dormant pathway: near 0)."""
    added = pair_writes(ctx.model, ctx.layer, ctx.pairs["train"]) - ctx.writes
    t = ctx.target.double() / ctx.target.double().norm()
    return float((added @ t).abs().mean()) / ctx.gap


def case_row(name: str, truth: str, layer: int, site: str, checks, **extra) -> dict:
    """One case: truth, FLDD, gate position, verdict, score, warnings, whether it missed."""
    v = illusion.verdict(checks)
    effect = next(c for c in checks if c.name == "effect")
    illusory = truth == "illusory"
    miss = (illusory and v.gate.ok and v.klass != illusion.LIKELY_ILLUSORY) or (
        not illusory and v.label == illusion.LIKELY_ILLUSORY
    )
    judged = [c for c in checks if c.warning is not None]
    reason = "; ".join(
        f"{c.name} {c.value:.3g} vs {c.threshold:.3g} ({illusion.warning_word(c)})" for c in judged
    )
    low, high = effect.value_ci
    return {
        "case": name,
        "truth": truth,
        "layer": layer,
        "site": site,
        "fldd": effect.value,
        "fldd_low": low,
        "fldd_high": high,
        "gate": v.gate.threshold,
        "gate_pos": gate_position(low, high, v.gate.threshold),
        "matters": v.gate.ok,
        "verdict": v.klass,
        "label": v.label,
        "score": v.score,
        "n_warnings": v.n_warnings,
        "warned": ", ".join(v.warned),
        "site_notes": ", ".join(v.site_notes),
        "miss": miss,
        "reason": reason,
        "refused": False,
        **extra,
    }


def measured_case(model, site: M.SiteData, name: str, v: Tensor, truth: str, **extra):
    """(metric rows, case row) of one direction (or an orthonormal m×k basis) at a site."""
    dtype = site.splits["test"][0].base_act.dtype
    basis = (v / v.norm())[:, None].to(dtype) if v.ndim == 1 else v.to(dtype)
    keys = {"site": site.kind, "layer": site.layer, "case": name}
    rows, checks = M.measure_checks(model, site, basis, keys)
    extra = {"k": basis.shape[1]} | extra
    return rows, [case_row(name, truth, site.layer, site.kind, checks, **extra)]


def refused_row(name: str, kind: str, layer: int, ratio: float, n_cases: int) -> dict:
    """A refused edit: counted, never scored."""
    why = f"edit breaks the task: clean LD {ratio:.2f} × the unedited model's"
    return {"case": name, "kind": kind, "layer": layer, "site": "mlp_post", "refused": True} | {
        "reason": why,
        "clean_ratio": ratio,
        "n_cases": n_cases,
        "truth": "refused",
        "verdict": "refused",
        "label": "refused",
        "miss": False,
        "gate_pos": "n.a.",
    }


def site_at(ctx: Layer) -> M.SiteData:
    """The MLP site of the model as it is now (edited or not), with random-direction refs."""
    model, opts = ctx.model, ctx.opts
    splits = {k: prepare(model, b, "mlp_post", ctx.layer, ctx.engine) for k, b in ctx.pairs.items()}
    rand = R.random_direction_reference(model, splits["test"], opts.n_random_directions, opts.seed)
    refs = R.Refs(random_dirs=rand, random_mlp=ctx.site.refs.random_mlp)
    rand_mlp = list(ctx.site.refs.random_mlp.values) or None
    return M.site_data(
        model,
        splits,
        "mlp_post",
        ctx.layer,
        ctx.site.th,
        refs,
        ctx.site.natural,
        rand_mlp,
        opts.seed,
    )


def clean_ld(site: M.SiteData) -> float:
    """The mean clean LD over the site's test pairs."""
    return float(torch.cat([p.clean_ld for p in site.splits["test"]]).double().mean())


def in_edit(ctx: Layer, delta: Tensor, name: str, kind: str, n_cases: int, cases: Callable):
    """(rows, case rows) of `cases(edited site)` in the model with W_out += delta; one refused
    row instead, before anything else is measured, when the edit breaks the task."""
    with edited_w_out(ctx.model, ctx.layer, delta):
        test = prepare(ctx.model, ctx.pairs["test"], "mlp_post", ctx.layer, ctx.engine)
        ratio = float(torch.cat([p.clean_ld for p in test]).double().mean()) / ctx.clean
        measured = {"clean_ratio": ratio, "edit_write": edit_write(ctx)}
        if ratio < ctx.opts.min_clean_ratio:
            log.warning(
                "MLP%d %s: the edit breaks the task (clean LD × %.2f); refused",
                ctx.layer,
                name,
                ratio,
            )
            return [], [refused_row(name, kind, ctx.layer, ratio, n_cases) | measured]
        rows, out = cases(site_at(ctx))
    return rows, [c | measured for c in out]


def trained_v_resid(model, resid: M.Splits, method: DasSettings, seed: int):
    """1-D DAS at resid_post (unit, float64) and its history."""
    rot, hist = train_das(model, resid["train"], resid["test"], method, seed)
    v = rot.basis.detach()[:, 0].double()
    return v / v.norm(), hist


def resid_cases(model, resid: M.Splits, layer: int, v_resid: Tensor, th, opts) -> tuple:
    """(rows, case rows) of v_resid and the residual's variable direction at resid_post."""
    rand = R.random_direction_reference(model, resid["test"], opts.n_random_directions, opts.seed)
    site = M.site_data(
        model, resid, "resid_post", layer, th, R.Refs(random_dirs=rand), seed=opts.seed
    )
    rows, cases = [], []
    for name, v in (
        ("real v_resid (DAS)", v_resid),
        ("real resid variable direction", planted.variable_direction(resid["train"])),
    ):
        r, c = measured_case(model, site, name, v, "real", kind="residual")
        rows, cases = rows + r, cases + c
    return rows, cases


def toy_rows(th: Thresholds) -> list[dict]:
    """The toy model's planted cases."""
    return [
        case_row(name, truth, -1, "toy", toy_checks(model, u, th), kind="toy")
        for name, (model, u, truth) in toy_cases().items()
    ]


def mlp_site(
    model, splits: M.Splits, layer: int, th, opts: BenchOptions, natural: Tensor, method, store
) -> tuple[M.SiteData, dict]:
    """The unedited MLP site with all its references; the random-MLP runs' histories (none
    with `random_mlp_seeds` 0: a site note, it never changes a label)."""
    seeds = range(opts.seed, opts.seed + opts.random_mlp_seeds)
    random_mlp, hist = (
        R.random_mlp_reference(model, splits, layer, method, seeds, store)
        if seeds
        else (R.Reference("random-MLP DAS (0 seeds)"), {})
    )
    rand = list(random_mlp.values)
    refs = R.Refs(
        random_dirs=R.random_direction_reference(
            model, splits["test"], opts.n_random_directions, opts.seed
        ),
        random_mlp=random_mlp,
    )
    site = M.site_data(model, splits, "mlp_post", layer, th, refs, natural, rand or None, opts.seed)
    site.refs = M.natural_references(model, site, opts.n_natural)
    return site, hist
