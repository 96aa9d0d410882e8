"""Running the illusion checks on one direction, and planted directions with known answers.

`measure_checks` runs every check of `mlpim.analysis.illusion` on a unit direction at a site (the
patches behind them on the prepared pairs), judged against references measured once per site
(`mlpim.analysis.references`); `illusion_check` and `illusion_benchmark` both call it.

The planted recipe (the paper's construction of an illusory direction) at an MLP hidden site:
- irrelevant: the W_out-nullspace part of the ABB-minus-BAB mean hidden difference (it separates
  the patterns and W_out never reads it);
- dormant: a row-space direction that W_out maps onto the residual circuit direction (v_resid),
  exactly when it may use the whole row space (`dims` None), else as nearly as the `dims`
  row-space directions of least natural variation allow;
- illusory(θ) = cos θ · irrelevant + sin θ · dormant.
Real directions: the hidden mean difference, its row-space part (the MLP's natural output already
varies with the pattern along it), and v_resid and the residual mean difference at the handover
residual.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import controls, illusion
from mlpim.analysis import nullspace as ns
from mlpim.analysis.references import (
    Reference,
    Refs,
    natural_directions,
    natural_dormant_ratios,
    random_unit_directions,
)
from mlpim.analysis.toy import FLIP_PAIRS
from mlpim.engine.interventions import Prepared, evaluate
from mlpim.engine.patching import subspace, subspace_patch, work_dtype
from mlpim.report import io

Splits = dict[str, list[Prepared]]


def acts(prepared: list[Prepared]) -> tuple[Tensor, Tensor]:
    """Base and source site activations over all pairs."""
    return torch.cat([p.base_act for p in prepared]), torch.cat([p.source_act for p in prepared])


def fldds(rows: list[dict], split: str = "test") -> dict[str, float]:
    """FLDD per intervention on one split (mean over seeds where there are several)."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["split"] == split and r["metric"] == "fldd":
            out.setdefault(r["intervention"], []).append(r["value"])
    return {k: sum(v) / len(v) for k, v in out.items()}


# held-out sets beyond the test pairs, where the task has them (IOI)
HELD_OUT = ("new templates", "new names")


def generalisation(
    model, splits: Splits, v: Tensor, fldd_test: float, refs: Refs, th, keys: dict
) -> tuple[list[dict], illusion.Check]:
    """Check 6: v's FLDD on the train pairs whose answer changes vs on each held-out set (the test
    pairs' `fldd_test` is already measured; the rows: FLDD per set, split "train (changing)",
    "new templates", "new names")."""
    setter = subspace(ns.unit_basis(v))
    train = controls.changing_fldd(model, splits["train"], setter)
    held = {"test": fldd_test}
    held |= {k: evaluate(model, splits[k], setter)["fldd"] for k in HELD_OUT if k in splits}
    rows = [r for k, f in {"train (changing)": train, **held}.items() if k != "test"
            for r in io.metric_rows({"fldd": f}, intervention="das", split=k, **keys)]  # fmt: skip
    return rows, illusion.generalisation_check(train, held, refs, th)


def measure_checks(
    model, splits: Splits, kind: str, layer: int, v: Float[Tensor, " m"], refs: Refs,
    th: illusion.Thresholds, keys: dict, v_ref: Tensor | None = None, n_align: int = 1000,
) -> tuple[list[dict], list[illusion.Check]]:  # fmt: skip
    """Every check on unit v at (kind, layer): the patching rows (test pairs) and the checks.

    MLP-only checks are n.a. at other sites; alignment needs `v_ref`; random_mlp needs the
    random-MLP reference in `refs`.
    """
    if kind != "mlp_post":
        test = {"test": splits["test"]}
        rows = controls.patching_rows(model, test, {"das": ns.unit_basis(v)}, kind, layer, keys)
        f = fldds(rows)
        why = f"needs an MLP hidden site (mlp_post), not {kind}"
        checks = [illusion.effect_check(f["das"], refs, th),
                  illusion.component_check(f["das"], f["full"], refs, th)]  # fmt: skip
        checks += [illusion.not_applicable(n, why) for n in illusion.CHECKS[2:-1]]
        g_rows, g = generalisation(model, splits, v, f["das"], refs, th, keys)
        return rows + g_rows, [*checks, g]
    w_out = ns.mlp_w_out(model, layer)
    proj, null = ns.split(v, w_out)
    bases = controls.intervention_bases(v, proj, null)
    rows = controls.patching_rows(model, {"test": splits["test"]}, bases, kind, layer, keys)
    for name, part in (("row_proj", proj), ("null_proj", null)):
        rows += io.metric_rows({"norm_sq": part.norm().item() ** 2}, intervention=name,
                               split="test", **keys)  # fmt: skip
    f = fldds(rows)
    checks = [illusion.effect_check(f["das"], refs, th)]
    checks += illusion.mlp_checks(f, v, w_out, *acts(splits["test"]), refs, th)
    checks.append(alignment(v, w_out, v_ref, n_align, keys.get("seed", 0)))
    checks.append(random_mlp(f["das"], refs, th))
    g_rows, g = generalisation(model, splits, v, f["das"], refs, th, keys)
    return rows + g_rows, [*checks, g]


def alignment(v: Tensor, w_out: Tensor, v_ref: Tensor | None, n: int, seed: int):
    """Check 4 against the reference residual direction, if there is one."""
    if v_ref is None:
        return illusion.not_applicable("alignment", "no reference residual direction given")
    return illusion.alignment_check(v, w_out, v_ref, n, seed)


def random_mlp(fldd_v: float, refs: Refs, th: illusion.Thresholds) -> illusion.Check:
    """Check 5 from the random-MLP reference (n.a. when it was not measured)."""
    values = refs.random_mlp.finite()
    if values.size == 0:
        return illusion.not_applicable("random_mlp", "no random-MLP DAS run (random_mlp_seeds=0)")
    return illusion.random_mlp_check(float(values.mean()), fldd_v, refs, th)


# ---------------------------------------------------------------- the planted recipe


def pattern_mean_diff(prepared: list[Prepared], which: str = "base_act") -> Tensor:
    """mean(ABB) − mean(BAB) of the base prompts' site activations (not normalised; at least
    float32)."""
    x = torch.cat([getattr(p, which) for p in prepared])
    x = x.to(work_dtype(x))
    pats = [pat for p in prepared for pat in p.pairs.base.pattern]
    abb = torch.tensor([q == "ABB" for q in pats], device=x.device)
    bab = torch.tensor([q == "BAB" for q in pats], device=x.device)
    return x[abb].mean(0) - x[bab].mean(0)


def irrelevant_direction(w_out: Tensor, mean_diff: Tensor) -> Tensor:
    """The unit W_out-nullspace part of the hidden mean difference."""
    _, null = ns.split(mean_diff, w_out)
    return null / null.norm()


def dormant_direction(
    w_out: Float[Tensor, "m d"], hidden: Float[Tensor, "n m"], target: Float[Tensor, " d"],
    dims: int | None = None,
) -> Tensor:  # fmt: skip
    """Unit d in W_out's row space with d @ W_out ∝ target as nearly as the `dims` row-space
    directions of least natural variance allow (None: the whole row space, exact)."""
    q = ns.row_space_basis(w_out).double()  # m × r
    if dims is not None and dims < q.shape[1]:
        centred = (hidden.double() - hidden.double().mean(0)) @ q
        _, _, vh = torch.linalg.svd(centred, full_matrices=True)
        q = q @ vh[-dims:].T  # the least-varying row-space directions
    b = (q.T @ w_out.double()).T  # d_model × k: what each basis direction writes
    a = torch.linalg.lstsq(b, target.double()[:, None]).solution[:, 0]
    d = q @ a
    return (d / d.norm()).to(work_dtype(w_out))


def oriented(v: Tensor, along: Tensor) -> Tensor:
    """v with its sign chosen so that it points along `along` (a DAS direction's sign is
    arbitrary; the planted recipe needs the one of the ABB−BAB difference)."""
    return v if float(v @ along) >= 0 else -v


def mix(irrelevant: Tensor, dormant: Tensor, degrees: float) -> Tensor:
    """cos θ · irrelevant + sin θ · dormant, normalised (the two are orthogonal)."""
    t = math.radians(degrees)
    v = math.cos(t) * irrelevant + math.sin(t) * dormant
    return v / v.norm()


# ---------------------------------------------------------------- the toy model's planted cases


def toy_effect(model, base: Tensor, source: Tensor, basis: Tensor) -> float:
    """FLDD analogue on a toy model: mean (y_patched − y_base) / (y_source − y_base)."""
    patched = subspace_patch(base, source, basis)
    y = model.readout
    return ((y(patched) - y(base)) / (y(source) - y(base))).mean().item()


def toy_checks(
    model, u: Tensor, th: illusion.Thresholds, n_random: int = 0
) -> list[illusion.Check]:
    """Checks 0-3 on the toy model (`mlpim.analysis.toy`) over its flip pairs, against random
    and natural directions of the same toy model; no random MLP, no held-out split. No random
    reference by default: in 3 dimensions a random direction reaches any effect."""
    xb, xs = (torch.tensor(x, dtype=u.dtype) for x in zip(*FLIP_PAIRS, strict=True))
    base, source, w_out = model.hidden(xb), model.hidden(xs), model.w_out[:, None]
    eff = lambda b: toy_effect(model, base, source, b)  # noqa: E731
    rand = [eff(r[:, None]) for r in random_unit_directions(model.d, n_random, 0).to(u)]
    nat = natural_directions(base, source, model.d)
    margins = []
    for n in nat:
        p, q = ns.split(n, w_out)
        f = {k: eff(b) for k, b in controls.intervention_bases(n, p, q).items()}
        margins.append(
            f["das"] - th.superadditive * (f.get("row_proj", 0) + max(f.get("null_proj", 0), 0))
        )
    refs = Refs(Reference("random directions", tuple(rand)), Reference("random-MLP DAS"),
                Reference("natural", tuple(natural_dormant_ratios(base, source, w_out, nat))),
                Reference("natural", tuple(margins)))  # fmt: skip
    proj, null = ns.split(u, w_out)
    f = {k: eff(b) for k, b in controls.intervention_bases(u, proj, null).items()}
    f["full"] = eff(torch.eye(model.d, dtype=u.dtype))
    return [illusion.effect_check(f["das"], refs, th),
            *illusion.mlp_checks(f, u, w_out, base, source, refs, th)]  # fmt: skip


def toy_cases() -> dict[str, tuple[object, Tensor, str]]:
    """name -> (toy model, unit direction, planted truth): the post's model and its k-neuron
    versions (k = 2, 4; the illusory direction is the sum of the k illusory columns)."""
    from mlpim.analysis import toy

    model = toy.post_model()
    cases = {"toy e1": (model, toy.unit(1, 0, 0), "real"),
             "toy (e2+e3)/√2": (model, toy.unit(0, 1, 1), "illusory")}  # fmt: skip
    for k in (2, 4):
        hd = toy.higher_dim(k)
        ill = hd.illusory.sum(1)
        cases[f"toy k={k} real"] = (hd.model, hd.real[:, 0], "real")
        cases[f"toy k={k} illusory"] = (hd.model, ill / ill.norm(), "illusory")
    return cases
