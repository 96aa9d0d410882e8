"""The post's toy model of the illusion: a 3-neuron linear network, patched with the real core.

Model (post, "Setup for the example"): x ∈ {−1, 1}, hidden h = x·W_in with W_in = (1, 1, 0),
output y = W_out·h with W_out = (1, 0, 2), so y = x. e1 is the real feature, e2 is irrelevant
(varies with x, unused), e3 is dormant (never varies, but read by W_out). Patching along
v = (e2 + e3)/√2 flips the output exactly like patching e1, by switching the dormant neuron on.

Every patch goes through `mlpim.engine.patching.subspace_patch`, the function the language-model
experiments use; nothing in the tables is typed in by hand. All functions are plain and work
from a notebook: `print(post_tables()["v_illusory"])`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis.rows import metric_rows
from mlpim.engine.patching import subspace_patch
from mlpim.engine.subspace import RotatedSubspace

DTYPE = torch.float64
XS = (1.0, -1.0)  # the data distribution
FLIP_PAIRS = ((1.0, -1.0), (-1.0, 1.0))  # (base x, source x): "into 1 from −1", "into −1 from 1"
ALL_PAIRS = tuple((b, s) for b in XS for s in XS)


@dataclass(frozen=True)
class ToyModel:
    """Linear x -> h = x·W_in -> y = h·W_out."""

    w_in: Float[Tensor, " d"]
    w_out: Float[Tensor, " d"]

    @property
    def d(self) -> int:
        """The hidden width."""
        return self.w_in.shape[0]

    def hidden(self, x: Float[Tensor, " b"]) -> Float[Tensor, "b d"]:
        """The hidden activations x · W_in."""
        return x[:, None] * self.w_in

    def readout(self, h: Float[Tensor, "b d"]) -> Float[Tensor, " b"]:
        """The output h · W_out."""
        return h @ self.w_out

    def __call__(self, x: Float[Tensor, " b"]) -> Float[Tensor, " b"]:
        return self.readout(self.hidden(x))


def vec(*coords: float) -> Tensor:
    """A float64 vector of `coords`."""
    return torch.tensor(coords, dtype=DTYPE)


def unit(*coords: float) -> Tensor:
    """The unit vector along `coords`."""
    v = vec(*coords)
    return v / v.norm()


def post_model() -> ToyModel:
    """W_in = (1, 1, 0), W_out = (1, 0, 2)."""
    return ToyModel(vec(1, 1, 0), vec(1, 0, 2))


def standard_directions() -> dict[str, Tensor]:
    """The standard basis e1, e2, e3."""
    return {"e1": unit(1, 0, 0), "e2": unit(0, 1, 0), "e3": unit(0, 0, 1)}


def post_directions() -> dict[str, Tensor]:
    """The two patches of the post: the real feature e1 and the illusory v = (e2 + e3)/√2."""
    return {"e1": unit(1, 0, 0), "v_illusory": unit(0, 1, 1)}


def rotated_basis() -> dict[str, Tensor]:
    """The appendix's basis (normalised): e2+e3, 2e1+e2−e3, −e1+e2−e3."""
    return {"e2+e3": unit(0, 1, 1), "2e1+e2-e3": unit(2, 1, -1), "-e1+e2-e3": unit(-1, 1, -1)}


def as_basis(direction: Tensor) -> Float[Tensor, "d k"]:
    """A direction [d] or a basis [d, k] -> a [d, k] basis."""
    return direction.reshape(direction.shape[0], -1)


# ---------------------------------------------------------------- patching


@dataclass(frozen=True)
class Patch:
    base_x: float
    source_x: float
    hidden_before: Tensor  # [d]
    hidden_after: Tensor  # [d]
    output_before: float
    output_after: float
    source_output: float  # the counterfactual: what the model outputs on the source input

    @property
    def label(self) -> str:
        """The pair as the post writes it, 'Into x from x′'."""
        return f"Into {fmt_num(self.base_x)} from {fmt_num(self.source_x)}"


def patch(model: ToyModel, direction: Tensor, base_x: float, source_x: float) -> Patch:
    """Patch the hidden layer along `direction` (or the span of a [d, k] basis) from source."""
    xb, xs = vec(base_x), vec(source_x)
    hb, hs = model.hidden(xb), model.hidden(xs)
    after = subspace_patch(hb, hs, as_basis(direction))
    return Patch(
        base_x=base_x,
        source_x=source_x,
        hidden_before=hb[0],
        hidden_after=after[0],
        output_before=model(xb).item(),
        output_after=model.readout(after).item(),
        source_output=model(xs).item(),
    )


def patch_pairs(model: ToyModel, direction: Tensor, pairs=FLIP_PAIRS) -> list[Patch]:
    """One `Patch` per (base x, source x) of `pairs`."""
    return [patch(model, direction, b, s) for b, s in pairs]


def full_basis(d: int) -> Tensor:
    """Patching along all of R^d is the full-component patch."""
    return torch.eye(d, dtype=DTYPE)


# ---------------------------------------------------------------- formatting


def fmt_num(x: float, digits: int = 6) -> str:
    """1.0 -> '1', -1.0 -> '−1', 0.7071 -> '0.707107'; −0 prints as 0."""
    x = round(float(x), digits) + 0.0
    s = str(int(x)) if x == int(x) else f"{x:.{digits}g}"
    return s.replace("-", "−")


def fmt_vec(v: Tensor) -> str:
    """A vector as '(a, b, c)' with `fmt_num` entries."""
    return "(" + ", ".join(fmt_num(c) for c in v.tolist()) + ")"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; a `|` inside a cell is escaped."""

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def patch_table(patches: list[Patch]) -> str:
    """The post's table: patch, intermediate activation before → after, output before → after."""
    rows = [
        [
            p.label,
            f"{fmt_vec(p.hidden_before)} → {fmt_vec(p.hidden_after)}",
            f"{fmt_num(p.output_before)} → {fmt_num(p.output_after)}",
        ]
        for p in patches
    ]
    return markdown(
        ["Patch", "Intermediate activation before → after", "Output before → after"], rows
    )


def post_tables(model: ToyModel | None = None) -> dict[str, str]:
    """The post's two tables, keyed by direction name (e1, v_illusory), as markdown."""
    model = model or post_model()
    return {n: patch_table(patch_pairs(model, u)) for n, u in post_directions().items()}


# ---------------------------------------------------------------- correlated / causal


def classify(model: ToyModel, direction: Tensor, tol: float = 1e-9) -> dict[str, float]:
    """Measure whether a unit direction u is correlated and/or causal.

    projection_spread: max − min over the data of h(x)·u (correlated when > 0).
    output_sensitivity: |y(h + u) − y(h)|, the effect of moving the activation along u (causal
    when > 0; the post's sense: the output depends on it).
    patch_output_change: mean |y_patched − y_base| when patching along u between x = 1 and −1 —
    only a direction that is both correlated and causal changes the output under patching.
    """
    u = direction / direction.norm()
    h = model.hidden(vec(*XS))
    proj = h @ u
    spread = (proj.max() - proj.min()).item()
    sens = (model.readout(h + u) - model.readout(h)).abs().mean().item()
    change = sum(abs(p.output_after - p.output_before) for p in patch_pairs(model, u)) / 2
    return {
        "projection_spread": spread,
        "output_sensitivity": sens,
        "patch_output_change": change,
        "correlated": float(spread > tol),
        "causal": float(sens > tol),
    }


ROLES = {
    (True, True): "correlated and causal",
    (True, False): "correlated but acausal (irrelevant)",
    (False, True): "uncorrelated but causal (dormant)",
    (False, False): "neither",
}


def role(c: dict[str, float]) -> str:
    """The role ('real', 'illusory' ...) of a direction's measurements."""
    return ROLES[(bool(c["correlated"]), bool(c["causal"]))]


def classification_frame(model: ToyModel, directions: dict[str, Tensor]) -> pd.DataFrame:
    """One row per direction: its `classify` measurements and role."""
    rows = []
    for name, u in directions.items():
        c = classify(model, u)
        rows.append({"direction": name, **c, "role": role(c)})
    return pd.DataFrame(rows)


def classification_table(frame: pd.DataFrame) -> str:
    """A classification frame as a markdown table."""
    rows = [
        [
            r.direction,
            fmt_num(r.projection_spread, 4),
            fmt_num(r.output_sensitivity, 4),
            fmt_num(r.patch_output_change, 4),
            r.role,
        ]
        for r in frame.itertuples()
    ]
    header = [
        "direction (normalised)",
        "projection spread over x",
        "|Δy| per unit along it",
        "|Δy| when patched",
        "role",
    ]
    return markdown(header, rows)


# ---------------------------------------------------------------- DAS


@contextmanager
def _single_thread():
    """Tiny tensors: thread start-up dominates, so train on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass(frozen=True)
class DASResult:
    seed: int
    basis: Tensor  # [d, k]
    loss: float
    iia: float
    flip_rate: float


def das_pairs(model: ToyModel):
    """All (base, source) pairs of the data, their hidden activations and counterfactual."""
    xb = vec(*(b for b, _ in ALL_PAIRS))
    xs = vec(*(s for _, s in ALL_PAIRS))
    return model.hidden(xb), model.hidden(xs), model(xs)


def train_das(
    model: ToyModel,
    k: int = 1,
    seed: int = 0,
    steps: int = 300,
    lr: float = 0.05,
    tol: float = 0.05,
) -> DASResult:
    """DAS: a RotatedSubspace (d×k) trained so that the patched output equals the source output.

    Loss: MSE between the patched output and the counterfactual output (the model's output on
    the source input, i.e. x′) over all four (base, source) pairs; Adam with a linear decay to
    0.1× like the language-model runs. IIA: share of pairs with |patched − counterfactual| < tol;
    flip_rate: share of the two x ≠ x′ pairs whose output sign becomes the source's.
    """
    hb, hs, target = das_pairs(model)
    # torch's orthogonal parametrization completes the d×k start to a d×d orthogonal matrix with
    # the global RNG, so seed that too (inside fork_rng, leaving the caller's RNG untouched).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sub = RotatedSubspace(model.d, k, generator=torch.Generator().manual_seed(seed))
    sub = sub.to(DTYPE)
    opt = torch.optim.Adam(sub.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=steps)
    with _single_thread():
        for _ in range(steps):
            loss = ((model.readout(sub(hb, hs)) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            basis = sub.basis.detach().clone()
    return das_result(model, basis, seed, tol)


def das_result(model: ToyModel, basis: Tensor, seed: int = -1, tol: float = 0.05) -> DASResult:
    """The measurements of one DAS solution `basis` (IIA, flips, cosines)."""
    hb, hs, target = das_pairs(model)
    out = model.readout(subspace_patch(hb, hs, basis))
    flips = [
        float(torch.sign(torch.tensor(patch(model, basis, b, s).output_after)) == s)
        for b, s in FLIP_PAIRS
    ]
    return DASResult(
        seed=seed,
        basis=basis,
        loss=((out - target) ** 2).mean().item(),
        iia=((out - target).abs() < tol).double().mean().item(),
        flip_rate=sum(flips) / len(flips),
    )


def describe_direction(model: ToyModel, u: Tensor) -> dict[str, float]:
    """Where a 1-D solution u lies: cosines with e1, v, W_in, and the dormant share.

    dormant_share: the fraction of the patch's change of the output carried by the dormant
    neuron e3, W_out[3]·Δh_3 / (W_out·Δh), measured on the patch into 1 from −1 (0 for e1 and
    for W_in, 1 for v).
    """
    u = u.reshape(-1)
    p = patch(model, u, 1.0, -1.0)
    dh = p.hidden_after - p.hidden_before
    total = (model.w_out * dh).sum().item()
    dormant = (model.w_out[2] * dh[2]).item()
    return {
        "abs_cos_e1": abs(u[0].item()),
        "abs_cos_v": abs((u @ unit(0, 1, 1)).item()),
        "abs_cos_w_in": abs((u @ (model.w_in / model.w_in.norm())).item()),
        "dormant_share": dormant / total if abs(total) > 1e-12 else math.nan,
    }


def das_category(row: dict, e1_cos: float = 0.9, dormant: float = 0.5) -> str:
    """e1 (|cos e1| ≥ 0.9), illusory (perfect, not e1, most of the effect via the dormant
    neuron), other (perfect, not e1, mostly via e1, e.g. near W_in), failed (IIA < 1)."""
    if row["iia"] < 1:
        return "failed"
    if row["abs_cos_e1"] >= e1_cos:
        return "e1"
    return "illusory" if row["dormant_share"] >= dormant else "other"


def das_seeds(
    model: ToyModel | None = None, n_seeds: int = 50, seed0: int = 0, **kw
) -> pd.DataFrame:
    """One row per seed: loss, IIA, flip rate, cosines, dormant share, category."""
    model = model or post_model()
    rows = []
    for s in range(seed0, seed0 + n_seeds):
        r = train_das(model, seed=s, **kw)
        row = {"seed": s, "loss": r.loss, "iia": r.iia, "flip_rate": r.flip_rate}
        row |= describe_direction(model, r.basis[:, 0])
        row["u1"], row["u2"], row["u3"] = r.basis[:, 0].tolist()
        row["category"] = das_category(row)
        rows.append(row)
    return pd.DataFrame(rows)


def das_summary(seeds: pd.DataFrame) -> dict[str, float]:
    """The shares of DAS restarts with IIA 1, on e1 and illusory."""
    n = len(seeds)
    perfect = seeds.iia == 1
    return {
        "n_seeds": n,
        "frac_iia_1": perfect.mean(),
        "frac_e1": (seeds.category == "e1").mean(),
        "frac_not_e1": (perfect & (seeds.abs_cos_e1 < 0.9)).mean(),  # the brief's criterion
        "frac_illusory": (seeds.category == "illusory").mean(),
        "frac_other": (seeds.category == "other").mean(),
        "max_loss": seeds.loss.max(),
    }


def das_table(summary: dict[str, float]) -> str:
    """A DAS summary as a markdown table."""
    labels = {
        "n_seeds": "seeds",
        "frac_iia_1": "IIA = 1 (patched output = x′ on all pairs)",
        "frac_e1": "e1 (|cos e1| ≥ 0.9)",
        "frac_not_e1": "not e1: |cos e1| < 0.9 and IIA = 1",
        "frac_illusory": "… of which illusory (≥ 50% of the flip via the dormant e3)",
        "frac_other": "… of which other (flip mostly via e1, e.g. near W_in)",
        "max_loss": "largest final MSE",
    }
    rows = [
        [labels[k], fmt_num(v, 4) if k in ("n_seeds", "max_loss") else f"{v:.0%}"]
        for k, v in summary.items()
    ]
    return markdown(["DAS solutions (d = 3, k = 1)", "value"], rows)


# ---------------------------------------------------------------- higher dimensions


@dataclass(frozen=True)
class HigherDim:
    """One real neuron, k irrelevant, k dormant (and `extra` unused) neurons."""

    model: ToyModel
    k: int
    real: Tensor  # [d, 1]
    irrelevant: Tensor  # [d, k]
    dormant: Tensor  # [d, k]
    illusory: Tensor  # [d, k]: columns (e_irrelevant_i + e_dormant_i)/√2


def higher_dim(k: int, extra: int = 0) -> HigherDim:
    """Hidden dim 2k + 1 + extra: neuron 0 real (W_in 1, W_out 1), 1..k irrelevant (W_in 1,
    W_out 0), k+1..2k dormant (W_in 0, W_out 2/k), the rest zero. y = x; k = 1 is the post's model.
    The dormant weight 2/k makes the k-dim illusory patch flip the output exactly."""
    d = 2 * k + 1 + extra
    eye = torch.eye(d, dtype=DTYPE)
    irr, dor = list(range(1, k + 1)), list(range(k + 1, 2 * k + 1))
    w_in, w_out = torch.zeros(d, dtype=DTYPE), torch.zeros(d, dtype=DTYPE)
    w_in[0] = w_out[0] = 1.0
    w_in[irr] = 1.0
    w_out[dor] = 2.0 / k
    illusory = (eye[:, irr] + eye[:, dor]) / math.sqrt(2)
    return HigherDim(
        model=ToyModel(w_in, w_out),
        k=k,
        real=eye[:, :1],
        irrelevant=eye[:, irr],
        dormant=eye[:, dor],
        illusory=illusory,
    )


def higher_dim_measures(hd: HigherDim) -> pd.DataFrame:
    """Per intervention: output after the patch into 1 from −1, IIA and flip rate over the two
    flip pairs, and the largest |dormant activation| after the patch (0 on the data)."""
    subspaces = {
        "real": hd.real,
        "v_illusory": hd.illusory,
        "irrelevant_only": hd.irrelevant,
        "dormant_only": hd.dormant,
        "full": full_basis(hd.model.d),
    }
    rows = []
    for name, basis in subspaces.items():
        ps = patch_pairs(hd.model, basis)
        dormant_act = max((p.hidden_after @ hd.dormant).abs().max().item() for p in ps)
        rows.append(
            {
                "intervention": name,
                "k": hd.k,
                "d": hd.model.d,
                "subspace_dim": basis.shape[1],
                "output_after": ps[0].output_after,
                "iia": sum(abs(p.output_after - p.source_output) < 1e-9 for p in ps) / len(ps),
                "flip_rate": sum(math.copysign(1, p.output_after) == p.source_x for p in ps)
                / len(ps),
                "dormant_activation": dormant_act,
            }
        )
    return pd.DataFrame(rows)


def higher_dim_table(frame: pd.DataFrame) -> str:
    """The k-dim construction's measurements as a markdown table."""
    rows = [
        [
            int(r.k),
            int(r.d),
            r.intervention,
            int(r.subspace_dim),
            fmt_num(r.output_after, 4),
            f"{r.iia:.0%}",
            fmt_num(r.dormant_activation, 4),
        ]
        for r in frame.itertuples()
    ]
    header = [
        "k",
        "hidden dim",
        "patch",
        "subspace dim",
        "output into 1 from −1",
        "IIA",
        "max |dormant act.| after",
    ]
    return markdown(header, rows)


# ----- toy_illusion's tidy rows -----

KEYS = {"site": "hidden", "layer": 0, "split": "all"}


def pair_name(base_x: float, source_x: float) -> str:
    """A pair's label `base<-source` (ASCII minus)."""
    return f"{fmt_num(base_x)}<-{fmt_num(source_x)}".replace("−", "-")


def table_rows(model: ToyModel) -> list[dict]:
    """Per intervention and pair: hidden and output before/after; per intervention: rates."""
    rows = []
    directions = {**post_directions(), "full": full_basis(model.d)}
    for name, u in directions.items():
        patches = patch_pairs(model, u)
        for p in patches:
            values = {
                "output_before": p.output_before,
                "output_after": p.output_after,
                "source_output": p.source_output,
            }
            values |= {f"hidden_before_{i + 1}": v for i, v in enumerate(p.hidden_before.tolist())}
            values |= {f"hidden_after_{i + 1}": v for i, v in enumerate(p.hidden_after.tolist())}
            rows += metric_rows(
                values,
                intervention=name,
                **KEYS,
                part="tables",
                pair=pair_name(p.base_x, p.source_x),
            )
        rates = {
            "flip_rate": sum(p.output_after * p.source_x > 0 for p in patches) / len(patches),
            "iia": sum(abs(p.output_after - p.source_output) < 1e-9 for p in patches)
            / len(patches),
            "dormant_activation": max(abs(p.hidden_after[2].item()) for p in patches),
        }
        rows += metric_rows(rates, intervention=name, **KEYS, part="tables", pair="all")
    return rows


def classification_rows(frame: pd.DataFrame, basis: str) -> list[dict]:
    """Rows of the correlated/causal measurements of each direction of one basis."""
    rows = []
    for r in frame.to_dict("records"):
        values = {k: v for k, v in r.items() if k not in ("direction", "role")}
        rows += metric_rows(values, intervention=r["direction"], **KEYS, part=basis, pair="all")
    return rows


def das_rows(seeds: pd.DataFrame) -> list[dict]:
    """Rows of every DAS restart: loss, IIA, cosines and what it landed on."""
    rows = []
    metrics = [
        "loss",
        "iia",
        "flip_rate",
        "abs_cos_e1",
        "abs_cos_v",
        "abs_cos_w_in",
        "dormant_share",
    ]
    for r in seeds.to_dict("records"):
        values = {m: r[m] for m in metrics}
        values |= {
            "is_e1": float(r["category"] == "e1"),
            "is_illusory": float(r["category"] == "illusory"),
            "is_not_e1": float(r["iia"] == 1 and r["abs_cos_e1"] < 0.9),
        }
        rows += metric_rows(values, intervention="das", **KEYS, part="das", seed=r["seed"])
    return rows


def higher_dim_rows(frame: pd.DataFrame) -> list[dict]:
    """Rows of the k-dim construction, one intervention per k."""
    rows = []
    for r in frame.to_dict("records"):
        values = {m: r[m] for m in ("output_after", "iia", "flip_rate", "dormant_activation")}
        name = f"{r['intervention']}_k{r['k']}"  # distinct from the 3-D model's interventions
        rows += metric_rows(
            values,
            intervention=name,
            **KEYS,
            part="higher_dim",
            k=r["k"],
            hidden_dim=r["d"],
            subspace_dim=r["subspace_dim"],
        )
    return rows
