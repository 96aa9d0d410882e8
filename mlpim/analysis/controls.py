"""Controls shared by the illusion runners: the random-MLP baseline, patching a direction and its
W_out parts, mean-difference directions.

Moved here from the experiment modules (ioi_random_mlp, ioi_nullspace, subspace), which import
them from here, so that no experiment imports another.

Random MLP: f(x) = W2 act(W1 norm(x) + b1) + b2 (the real MLP's widths and activation) reads the
real MLP's input, resid_mid at END; W2, b2 are scaled so that its mean output norm on the training
prompts equals the real MLP's. DAS trains a direction in its hidden activations h; the patch adds
f(h') - f(h_base) = W2 (h' - h_base) to the real MLP output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from mlpim import reuse
from mlpim.analysis import nullspace as ns
from mlpim.analysis.rows import metric_rows
from mlpim.engine.das import DasSettings, fit, fit_many
from mlpim.engine.family import family_of
from mlpim.engine.fastpath import EndState
from mlpim.engine.interventions import (
    Prepared,
    clean_metrics,
    evaluate,
    guard,
    patched_end_lds,
    prepared_key,
)
from mlpim.engine.metrics import fldd
from mlpim.engine.models import hook_name
from mlpim.engine.patching import (
    full,
    site_acts,
    source_acts,
    subspace,
    work_dtype,
)
from mlpim.engine.subspace import RotatedSubspace
from mlpim.errors import ConfigError

PARTS = ("row_proj", "null_proj")

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


@dataclass(frozen=True)
class RandomMLP:
    """f(x) = W2 act(W1 norm(x) + b1) + b2; norm has no learned weights (LayerNorm or RMSNorm)."""

    w1: Float[Tensor, "d m"]
    b1: Float[Tensor, m]
    w2: Float[Tensor, "m d"]
    b2: Float[Tensor, d]
    act: str
    centered: bool  # LayerNorm (subtract the mean) vs RMSNorm
    eps: float = 1e-5

    def norm(self, x: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
        """x normalised without learned weights (LayerNorm or RMSNorm)."""
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def hidden(self, x: Float[Tensor, "b d"]) -> Float[Tensor, "b m"]:
        """The hidden activations act(W1 norm(x) + b1)."""
        return ACTIVATIONS[self.act](self.norm(x.to(self.w1.dtype)) @ self.w1 + self.b1)

    def out(self, h: Float[Tensor, "b m"]) -> Float[Tensor, "b d"]:
        """The output W2 h + b2 of hidden activations h."""
        return h @ self.w2 + self.b2

    def __call__(self, x: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
        return self.out(self.hidden(x))

    def scaled(self, c: float) -> RandomMLP:
        """The same MLP with its output multiplied by c (W2 and b2 scaled)."""
        return replace(self, w2=self.w2 * c, b2=self.b2 * c)


def _uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)


def draw_random_mlp(d: int, m: int, act: str, centered: bool, seed: int) -> RandomMLP:
    """Weights and biases drawn as torch's nn.Linear default: U(±1/sqrt(fan_in))."""
    if act not in ACTIVATIONS:
        raise ConfigError(f"no random-MLP activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    gen = torch.Generator().manual_seed(seed)
    w1, b1 = _uniform((d, m), d, gen), _uniform((m,), d, gen)
    w2, b2 = _uniform((m, d), m, gen), _uniform((d,), m, gen)
    return RandomMLP(w1=w1, b1=b1, w2=w2, b2=b2, act=act, centered=centered)


def mean_norm(x: Float[Tensor, "n d"]) -> float:
    """The mean Euclidean norm of the rows of x."""
    return x.norm(dim=-1).mean().item()


def matched_random_mlp(
    model, mid: Float[Tensor, "n d"], real_out: Float[Tensor, "n d"], seed: int
) -> RandomMLP:
    """A random MLP shaped like the model's, scaled so mean ‖f(mid)‖ equals mean ‖real_out‖."""
    family = family_of(model)
    d, m = model.cfg.d_model, model.cfg.d_mlp
    mlp = draw_random_mlp(d, m, family.act_fn, not family.rms_norm, seed)
    like = mid.to(work_dtype(mid))
    mlp = replace(mlp, **{k: getattr(mlp, k).to(like) for k in ("w1", "b1", "w2", "b2")})
    with torch.no_grad():
        return mlp.scaled(mean_norm(real_out) / mean_norm(mlp(mid)))


def random_patch(
    mlp: RandomMLP,
    basis: Float[Tensor, "m k"],
    out_base: Float[Tensor, "b d"],
    mid_base: Float[Tensor, "b d"],
    mid_src: Float[Tensor, "b d"],
) -> Float[Tensor, "b d"]:
    """Real MLP output plus W2 (h' - h_base), h' the subspace patch of the random hidden acts."""
    hb, hs = mlp.hidden(mid_base), mlp.hidden(mid_src)
    return out_base + (((hs - hb) @ basis) @ basis.T) @ mlp.w2


class RandomMLPPatch(nn.Module):
    """Setter at `mlp_out`; the source act carries [mlp_out | resid_mid | base resid_mid]
    (see `with_resid_mid`), so it works with any engine."""

    def __init__(self, mlp: RandomMLP, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.mlp = mlp
        self.rot = RotatedSubspace(mlp.w2.shape[0], dim, generator=generator)

    def forward(self, base: Float[Tensor, "b d"], source: Float[Tensor, "b 3d"]) -> Tensor:
        """The real MLP output with the random MLP's subspace patch added."""
        d = base.shape[-1]
        mid_src, mid_base = source[:, d : 2 * d], source[:, 2 * d :]
        return random_patch(self.mlp, self.rot.basis, base, mid_base, mid_src)


def mlp_reads(layer: int) -> tuple[str, str]:
    """The hooks `with_resid_mid` reads: the MLP's output and its input residual at `layer`."""
    return hook_name("mlp_out", layer), hook_name("resid_mid", layer)


def with_resid_mid(model, prepared: list[Prepared], layer: int) -> list[Prepared]:
    """The same batches at `mlp_out` of `layer`, their source acts carrying [mlp_out | resid_mid
    | base resid_mid] (`RandomMLPPatch` reads them), from batches prepared at `mlp_post` or
    `mlp_out` of that layer: the base run's state and END logits are shared, not copied. The two
    activations come from the preparation's own runs where it read them (`prepare(...,
    also=mlp_reads(layer))`), else from one run of the base and one of the source prompts up to
    the layer (a source that is its base prompt takes the base's). The guard checks the first."""
    out_name, mid_name = names = mlp_reads(layer)
    own = {hook_name(k, layer) for k in ("mlp_post", "mlp_out")}
    out = []
    for p in prepared:
        if p.name not in own:
            raise ValueError(f"{p.name} is not the MLP of layer {layer}: prepare it at mlp_out")
        base, src = _mlp_reads(model, p, names)
        act = torch.cat([src[out_name], src[mid_name], base[mid_name]], -1)
        state = replace(p.state, kind="mlp_out") if isinstance(p.state, EndState) else p.state
        out.append(replace(p, name=out_name, base_act=base[out_name], source_act=act, state=state))
    if out:
        guard(model, out[0])
    return out


def _mlp_reads(model, p: Prepared, names: tuple[str, str]) -> tuple[dict, dict]:
    """(base, source) activations of `names` for a prepared batch: read with it, or run now."""
    if all(n in p.extra for n in names):
        return {n: p.extra[n][0] for n in names}, {n: p.extra[n][1] for n in names}
    base = site_acts(model, p.pairs.base, list(names))
    return base, source_acts(model, p.pairs.base, p.pairs.source, list(names), base)


def augmented_splits(
    model, splits: dict[str, list[Prepared]], layer: int
) -> dict[str, list[Prepared]]:
    """The same pairs at `mlp_out` of `layer` with resid_mid appended (`with_resid_mid`), from
    splits prepared at the MLP of that layer."""
    key = lambda: (tuple((s, prepared_key(model, p)) for s, p in splits.items()), layer)  # noqa: E731
    make = lambda: {s: with_resid_mid(model, p, layer) for s, p in splits.items()}  # noqa: E731
    return dict(reuse.memo("augmented", key, make))


def split_acts(prepared: list[Prepared], d: int) -> tuple[Tensor, Tensor]:
    """(resid_mid, real mlp_out) of base and source prompts of augmented batches, stacked."""
    mids = [m for p in prepared for m in (p.source_act[:, 2 * d :], p.source_act[:, d : 2 * d])]
    outs = [o for p in prepared for o in (p.base_act, p.source_act[:, :d])]
    return torch.cat(mids), torch.cat(outs)


def train_random_das(
    model,
    train: list[Prepared],
    test: list[Prepared] | None,
    layer: int,
    mlp: RandomMLP,
    method: DasSettings,
    seed: int,
    progress: bool = True,
) -> tuple[RandomMLPPatch, pd.DataFrame]:
    """DAS on the random MLP's hidden acts: the loss, optimiser and schedule of `mlpim.engine.das`.
    The test pairs only add test IIA to the history: a run kept with them serves a run without."""
    test_key = prepared_key(model, test or None) if reuse.enabled() else None
    key = lambda: (prepared_key(model, train), layer, reuse.digest(mlp), method, seed)  # noqa: E731

    def compute():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        patch = RandomMLPPatch(mlp, method.dim, gen).to(train[0].base_act.device)
        desc = f"DAS random MLP L{layer} seed {seed}"
        return patch, fit(model, train, test, patch, method, gen, desc, progress), test_key

    patch, history, _ = reuse.replay(
        "random_das", key, compute, valid=lambda kept: test_key in (None, kept[2])
    )
    if not test and "test_iia" in history:
        history = history.drop(columns="test_iia")
    return patch, history


def train_random_das_many(
    model,
    train: list[Prepared],
    layer: int,
    mlps: list[RandomMLP],
    method: DasSettings,
    seeds: list[int],
    progress: bool = True,
) -> tuple[list[RandomMLPPatch], list[pd.DataFrame]]:
    """`train_random_das` (without test pairs) of one random MLP per seed, all trained together
    (`mlpim.engine.das.fit_many`): each seed's basis is drawn as `train_random_das` draws it; the
    batches come in one order for all, shuffled by a generator seeded with the first seed."""
    patches = []
    for mlp, seed in zip(mlps, seeds, strict=True):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        patches.append(RandomMLPPatch(mlp, method.dim, gen).to(train[0].base_act.device))
    gen = torch.Generator().manual_seed(seeds[0])
    desc = f"DAS {len(seeds)} random MLPs L{layer}"
    return patches, fit_many(model, train, patches, method, gen, desc, progress)


def random_mlp_run(
    model, aug: dict[str, list[Prepared]], layer: int, seed: int, method: DasSettings
) -> tuple[list[dict], pd.DataFrame]:
    """Draw, norm-match and DAS-train one random MLP; returns its metrics (and output norm) per
    split as rows, and its DAS history."""
    d = model.cfg.d_model
    mlp = matched_random_mlp(model, *split_acts(aug["train"], d), seed)
    patch, history = train_random_das(model, aug["train"], aug["test"], layer, mlp, method, seed)
    rows = []
    for split, prepared in aug.items():
        mid, _ = split_acts(prepared, d)
        with torch.no_grad():
            values = evaluate(model, prepared, patch) | {"out_norm": mean_norm(mlp(mid))}
        keys = {"site": "mlp_out", "layer": layer, "split": split, "seed": seed}
        rows += metric_rows(values, intervention="random_mlp", **keys)
    return rows, history


def random_mlp_history_name(seed: int) -> str:
    """The file name of one random MLP's DAS history in the run directory."""
    return f"history_random_mlp_seed{seed}.csv"


def intervention_bases(v: Tensor, proj: Tensor, null: Tensor) -> dict[str, Tensor]:
    """Orthonormal bases to patch along; parts that vanish (norm < 1e-6) are left out."""
    bases = {"das": ns.unit_basis(v)}
    alive = {n: p for n, p in zip(PARTS, (proj, null), strict=True) if p.norm() > 1e-6}
    bases |= {n: ns.unit_basis(p) for n, p in alive.items()}
    if len(alive) == 2:
        bases["span2"] = ns.unit_basis(proj, null)
    return bases


def patching_rows(model, splits, bases, kind: str, layer: int, keys: dict) -> list[dict]:
    """clean, full and every basis on train and test pairs."""
    rows = []
    for split, prepared in splits.items():
        rows += metric_rows(clean_metrics(prepared), intervention="clean", split=split, **keys)
        setters = {"full": full} | {n: subspace(b) for n, b in bases.items()}
        for name, setter in setters.items():
            values = evaluate(model, prepared, setter)
            rows += metric_rows(values, intervention=name, split=split, **keys)
    return rows


def mean_diff_direction(prepared: list[Prepared]) -> torch.Tensor:
    """Mean site activation of one class minus the other, normalised (d×1): IOI, ABB base
    prompts minus BAB ones; any other task, base prompts minus source prompts."""
    base = torch.cat([p.base_act for p in prepared])
    base = base.to(work_dtype(base))
    patterns = [pat for p in prepared for pat in getattr(p.pairs.base, "pattern", ())]
    if patterns:
        sign = torch.tensor([{"ABB": 1, "BAB": -1}.get(pat, 0) for pat in patterns])
        diff = base[sign == 1].mean(0) - base[sign == -1].mean(0)
    else:
        diff = base.mean(0) - torch.cat([p.source_act for p in prepared]).mean(0).to(base)
    return (diff / diff.norm())[:, None]


def changing_fldd(model, prepared: list[Prepared], setter) -> float:
    """FLDD over the pairs whose patched answer differs from the base answer (IOI: the
    opposite-pattern pairs ABB→BAB, BAB→ABB); NaN when there are none."""
    lds, clean = [], []
    with torch.no_grad():
        for p in prepared:
            keep = p.pairs.label != p.pairs.base.answer
            if keep.any():
                lds.append(patched_end_lds(model, p, setter)[keep])
                clean.append(p.clean_ld[keep])
    return fldd(torch.cat(lds), torch.cat(clean)) if lds else float("nan")
