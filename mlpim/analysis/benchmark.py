"""illusion_benchmark's cases: planted illusions and planted real directions around the landmark.

Per MLP layer: the residual circuit direction v_resid (1-D DAS at resid_post of the same layer),
the site's references (random directions, random-MLP DAS over seeds, natural directions), then

- planted illusions (`mlpim.analysis.planted`): irrelevant part mixed with the minimum-variance
  preimage of v_resid at each angle;
- planted real MLP directions: the hidden mean difference and its row-space part (the unedited
  MLP), and one rank-1 W_out edit per read direction (the centred mean difference, the top
  natural direction) that makes the MLP write the pattern along v_resid;
- real residual directions: v_resid and the residual mean difference.

Nothing here writes files: the runner saves what `LayerResult` returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from mlpim.analysis import illusion, planted
from mlpim.analysis import measure as M
from mlpim.analysis import nullspace as ns
from mlpim.analysis import references as R
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.editing import edited_w_out
from mlpim.analysis.stats import auc, roc
from mlpim.analysis.toy_cases import toy_cases, toy_checks
from mlpim.engine.das import DasSettings, train_das
from mlpim.engine.interventions import prepare

NAN = float("nan")
VERDICT_ORDER = (*illusion.LABELS, illusion.BORDERLINE)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchOptions:
    """What the benchmark plants and measures (config `extra.*`)."""

    angles: tuple[float, ...]
    edits: tuple[str, ...]  # read directions of the real edits: mean_diff, top_natural
    edit_strengths: tuple[float, ...]  # each edit writes strength × the residual's pattern gap
    n_random_directions: int
    n_natural: int
    random_mlp_seeds: int
    natural_ridge: float
    seed: int


@dataclass
class LayerResult:
    """One layer's metric rows, case rows, v_resid and the random-MLP training histories."""

    rows: list[dict] = field(default_factory=list)
    cases: list[dict] = field(default_factory=list)
    v_resid: Tensor | None = None
    histories: dict[int, pd.DataFrame] = field(default_factory=dict)


def case_row(name: str, truth: str, layer: int, site: str, checks, **extra) -> dict:
    """One case: truth, FLDD, verdict, score, which checks warned, whether the verdict missed."""
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
    return {
        "case": name,
        "truth": truth,
        "layer": layer,
        "site": site,
        "fldd": effect.value,
        "fldd_low": effect.value_ci[0],
        "fldd_high": effect.value_ci[1],
        "gate": v.gate.threshold,
        "matters": v.gate.ok,
        "verdict": v.klass,
        "label": v.label,
        "score": v.score,
        "n_warnings": v.n_warnings,
        "warned": ", ".join(v.warned),
        "site_notes": ", ".join(v.site_notes),
        "miss": miss,
        "reason": reason,
        **extra,
    }


def measured_case(model, site: M.SiteData, name: str, v: Tensor, truth: str, **extra):
    """(metric rows, case row) of one direction at a site."""
    keys = {"site": site.kind, "layer": site.layer, "case": name}
    rows, checks = M.measure_checks(model, site, (v / v.norm())[:, None], keys)
    return rows, case_row(name, truth, site.layer, site.kind, checks, **extra)


def illusion_cases(model, site: M.SiteData, target: Tensor, opts: BenchOptions) -> tuple:
    """(rows, case rows) of the planted illusions at each angle, with each one's properties."""
    w_out, natural = site.w_out, site.natural
    irr = planted.irrelevant_direction(w_out, planted.pattern_mean_diff(site.splits["train"]))
    cov = planted.covariance(natural, opts.natural_ridge)
    dor = planted.min_variance_preimage(site.w_resid, cov, target).to(w_out)  # writes the target
    var, pct = planted.variance_percentile(natural, dor, w_out, 1000, opts.seed)
    props = {
        "dormant_var": var,
        "dormant_var_pct": pct,
        "irrelevant_sep": planted.separation(site.splits["test"], irr),
    }
    rows, cases = [], []
    for a in tqdm(opts.angles, desc=f"planted illusions L{site.layer}", leave=False):
        r, c = measured_case(
            model, site, f"illusory {a:g}°", planted.mix(irr, dor, a), "illusory", angle=a, **props
        )
        rows, cases = rows + r, cases + [c]
    return rows, cases


def natural_real_cases(model, site: M.SiteData) -> tuple:
    """(rows, case rows): the hidden mean difference and its row-space part (unedited MLP)."""
    dh = planted.pattern_mean_diff(site.splits["train"])
    row, _ = ns.split(dh, site.w_out)
    rows, cases = [], []
    for name, v in (("real mean diff", dh), ("real row part", row)):
        r, c = measured_case(model, site, name, v, "real")
        rows, cases = rows + r, cases + [c]
    return rows, cases


def read_direction(site: M.SiteData, which: str) -> Tensor | None:
    """A centred hidden direction that varies with the pattern (mean_diff or top_natural); None
    where the site's activations do not vary between base and source prompts."""
    dh = planted.pattern_mean_diff(site.splits["train"])
    if which == "mean_diff":
        u = dh
    elif which == "top_natural":
        top = R.natural_directions(*M.acts(site.splits["train"]), 1)
        u = planted.oriented(top[0].to(dh), dh) if len(top) else dh.new_zeros(dh.shape)
    else:
        raise ValueError(f"unknown read direction {which!r} (mean_diff, top_natural)")
    if u.norm() == 0:
        log.warning("MLP%d's hidden activations do not vary: no %s edit", site.layer, which)
        return None
    return planted.centred(u / u.norm(), site.natural.mean(0))


def edited_case(
    model, site: M.SiteData, which: str, strength: float, target: Tensor, gap: float, opts, engine
):
    """(rows, case row) of one rank-1 real edit, prepared and checked in the edited model; no
    case (None) where there is nothing to read."""
    u = read_direction(site, which)
    if u is None:
        return [], None
    alpha = planted.edit_alpha(site.splits["train"], u, gap, strength)
    pairs = {k: [p.pairs for p in ps] for k, ps in site.splits.items()}
    with edited_w_out(model, site.layer, planted.edit_delta(u, target, alpha)):
        splits = {k: prepare(model, b, "mlp_post", site.layer, engine) for k, b in pairs.items()}
        refs = R.Refs(
            random_dirs=R.random_direction_reference(
                model, splits["test"], opts.n_random_directions, opts.seed
            ),
            random_mlp=site.refs.random_mlp,
        )
        rand = list(site.refs.random_mlp.values)
        edited = M.site_data(
            model, splits, "mlp_post", site.layer, site.th, refs, site.natural, rand, opts.seed
        )
        name = f"real edit ({which}, ×{strength:g})"
        r, c = measured_case(model, edited, name, u, "real", alpha=alpha)
    full = edited.full.fldd(edited.idx["test"]).value
    c |= {"full_fldd": full, "construction_ok": c["fldd"] > 0 and full >= 0.5 * c["fldd"]}
    return r, c


def resid_cases(model, resid: M.Splits, layer: int, v_resid: Tensor, th, opts) -> tuple:
    """(rows, case rows) of v_resid and the residual mean difference at resid_post."""
    refs = R.Refs(
        random_dirs=R.random_direction_reference(
            model, resid["test"], opts.n_random_directions, opts.seed
        )
    )
    site = M.site_data(model, resid, "resid_post", layer, th, refs, seed=opts.seed)
    md = planted.pattern_mean_diff(resid["train"])
    rows, cases = [], []
    for name, v in (("real v_resid (DAS)", v_resid), ("real resid mean diff", md)):
        r, c = measured_case(model, site, name, v, "real")
        rows, cases = rows + r, cases + [c]
    return rows, cases


def trained_v_resid(
    model, resid: M.Splits, method: DasSettings, seed: int
) -> tuple[Tensor, pd.DataFrame]:
    """1-D DAS at resid_post, its sign along the ABB−BAB mean difference; and its history."""
    rot, hist = train_das(model, resid["train"], resid["test"], method, seed)
    v = rot.basis.detach()[:, 0]
    return planted.oriented(v, planted.pattern_mean_diff(resid["train"])), hist


# ---------------------------------------------------------------- the table of cases


def truth_class(row) -> str:
    """Planted truth as a matrix row: illusions by the gate, real by site, toy cases apart."""
    if row.site == "toy":
        return f"toy {row.truth}"
    if row.truth == "illusory":
        return f"illusory (FLDD {'above' if row.matters else 'below'} the gate)"
    return f"real ({'MLP' if row.site == 'mlp_post' else 'residual'})"


def confusion(table: pd.DataFrame) -> pd.DataFrame:
    """Planted truth × verdict counts, borderline verdicts in their own column."""
    truth = table.apply(truth_class, axis=1)
    out = pd.crosstab(truth, table.verdict).reindex(columns=list(VERDICT_ORDER), fill_value=0)
    out.index.name = "planted"
    return out


def rates(table: pd.DataFrame) -> dict[str, float]:
    """The targets' numbers on the language model's cases (toy apart) and the score's AUC."""
    lm = table[table.site != "toy"]
    ill = lm[(lm.truth == "illusory") & lm.matters]
    real = lm[lm.truth == "real"]
    real_mlp = real[(real.site == "mlp_post") & real.matters]
    likely = illusion.LIKELY_ILLUSORY
    return {
        "illusions_above_gate": len(ill),
        "illusions_flagged": float((ill.label == likely).mean()) if len(ill) else NAN,
        "real": len(real),
        "real_called_illusory": int((real.label == likely).sum()),
        "real_mlp_above_gate": len(real_mlp),
        "auc": auc(ill.score.to_numpy(), real.score.to_numpy()),
        "auc_all_illusions": auc(
            lm[lm.truth == "illusory"].score.to_numpy(), real.score.to_numpy()
        ),
    }


def roc_curve(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the illusion score: illusions above the gate vs real (language model)."""
    lm = table[table.site != "toy"]
    pos = lm[(lm.truth == "illusory") & lm.matters].score.to_numpy()
    return roc(pos, lm[lm.truth == "real"].score.to_numpy())


def toy_rows(th: Thresholds) -> list[dict]:
    """The toy model's planted cases."""
    return [
        case_row(name, truth, -1, "toy", toy_checks(model, u, th))
        for name, (model, u, truth) in toy_cases().items()
    ]


# ---------------------------------------------------------------- one layer


def mlp_site(
    model,
    splits: M.Splits,
    layer: int,
    th,
    opts: BenchOptions,
    natural: Tensor,
    method: DasSettings,
    store,
) -> tuple[M.SiteData, dict]:
    """The unedited MLP site with all its references; and the random-MLP runs' histories."""
    seeds = range(opts.seed, opts.seed + opts.random_mlp_seeds)
    random_mlp, hist = R.random_mlp_reference(model, splits, layer, method, seeds, store)
    rand = list(random_mlp.values)
    refs = R.Refs(
        random_dirs=R.random_direction_reference(
            model, splits["test"], opts.n_random_directions, opts.seed
        ),
        random_mlp=random_mlp,
    )
    site = M.site_data(model, splits, "mlp_post", layer, th, refs, natural, rand, opts.seed)
    site.refs = M.natural_references(model, site, opts.n_natural)
    return site, hist


def layer_result(
    model,
    batches: dict[str, list],
    layer: int,
    th,
    opts: BenchOptions,
    natural: Tensor,
    method: DasSettings,
    random_method: DasSettings,
    engine: str,
    store=None,
) -> LayerResult:
    """Every planted case at one middle MLP and its resid_post (LayerResult), prepared with
    `engine`; v_resid trained with `method`, the random-MLP reference with `random_method`."""
    resid = {k: prepare(model, b, "resid_post", layer, engine) for k, b in batches.items()}
    v_resid, hist = trained_v_resid(model, resid, method, opts.seed)
    out = LayerResult(v_resid=v_resid)
    out.rows += [
        {
            "intervention": "v_resid",
            "site": "resid_post",
            "layer": layer,
            "split": "train",
            "metric": "train_loss",
            "value": hist.train_loss.iloc[-1],
        }
    ]
    mlp = {k: prepare(model, b, "mlp_post", layer, engine) for k, b in batches.items()}
    site, out.histories = mlp_site(model, mlp, layer, th, opts, natural, random_method, store)
    gap = planted.residual_gap(resid["train"], v_resid)
    for part in (illusion_cases(model, site, v_resid, opts), natural_real_cases(model, site)):
        out.rows, out.cases = out.rows + part[0], out.cases + part[1]
    for which in opts.edits:
        for strength in opts.edit_strengths:
            r, c = edited_case(model, site, which, strength, v_resid, gap, opts, engine)
            out.rows, out.cases = out.rows + r, out.cases + ([c] if c else [])
    r, c = resid_cases(model, resid, layer, v_resid, th, opts)
    out.rows, out.cases = out.rows + r, out.cases + c
    return out
