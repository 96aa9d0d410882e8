"""ioi_random_mlp: DAS finds an IOI subspace even in a random MLP placed where the middle MLP is.

A random MLP f(x) = W2 act(W1 norm(x) + b1) + b2 (the real MLP's widths and activation) reads the
real MLP's input, resid_mid at END; W2, b2 are scaled so that its mean output norm on the training
prompts equals the real MLP's. DAS trains a direction v in its hidden activations h; the patch
adds f(h') - f(h_base) = W2 (h' - h_base), h' = h_base + ((h_src - h_base)·v) v, to the real MLP
output. Its FLDD/IIA are compared with v_MLP's (DAS in the real MLP) and the full MLP patch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from omegaconf import DictConfig
from torch import Tensor, nn

from mlpim import constants as C
from mlpim.engine.das import fit
from mlpim.engine.interventions import Prepared, clean_metrics, evaluate, prepare
from mlpim.engine.models import ConfigError, hook_name
from mlpim.engine.patching import full, site_acts, subspace
from mlpim.engine.subspace import RotatedSubspace
from mlpim.experiments.common import model_for, paper_splits, site_of
from mlpim.experiments.ioi_dormant import das_direction
from mlpim.report import io

log = logging.getLogger(__name__)

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}
INTERVENTIONS = ("full", "das", "random_mlp")


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
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def hidden(self, x: Float[Tensor, "b d"]) -> Float[Tensor, "b m"]:
        return ACTIVATIONS[self.act](self.norm(x) @ self.w1 + self.b1)

    def out(self, h: Float[Tensor, "b m"]) -> Float[Tensor, "b d"]:
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
    return RandomMLP(w1, b1, w2, b2, act, centered)


def mean_norm(x: Float[Tensor, "n d"]) -> float:
    return x.norm(dim=-1).mean().item()


def matched_random_mlp(
    model, mid: Float[Tensor, "n d"], real_out: Float[Tensor, "n d"], seed: int
) -> RandomMLP:
    """A random MLP shaped like the model's, scaled so mean ‖f(mid)‖ equals mean ‖real_out‖."""
    centered = not model.cfg.normalization_type.startswith("RMS")
    mlp = draw_random_mlp(model.cfg.d_model, model.cfg.d_mlp, model.cfg.act_fn, centered, seed)
    mlp = replace(mlp, **{k: getattr(mlp, k).to(mid) for k in ("w1", "b1", "w2", "b2")})
    with torch.no_grad():
        return mlp.scaled(mean_norm(real_out) / mean_norm(mlp(mid)))


def random_patch(
    mlp: RandomMLP, basis: Float[Tensor, "m k"], out_base: Float[Tensor, "b d"],
    mid_base: Float[Tensor, "b d"], mid_src: Float[Tensor, "b d"],
) -> Float[Tensor, "b d"]:  # fmt: skip
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
        d = base.shape[-1]
        mid_src, mid_base = source[:, d : 2 * d], source[:, 2 * d :]
        return random_patch(self.mlp, self.rot.basis, base, mid_base, mid_src)


def with_resid_mid(model, prepared: list[Prepared], layer: int) -> list[Prepared]:
    """`mlp_out`-prepared batches whose source acts also carry resid_mid of source and base."""
    name = hook_name("resid_mid", layer)
    out = []
    for p in prepared:
        base_mid = site_acts(model, p.pairs.base, [name])[name]
        src_mid = site_acts(model, p.pairs.source, [name])[name]
        out.append(replace(p, source_act=torch.cat([p.source_act, src_mid, base_mid], -1)))
    return out


def augmented_splits(
    model, splits: dict[str, list[Prepared]], layer: int
) -> dict[str, list[Prepared]]:
    """The same pairs prepared at `mlp_out` of `layer`, with resid_mid appended (`with_resid_mid`)."""
    return {
        s: with_resid_mid(
            model,
            prepare(model, [p.pairs for p in prepared], "mlp_out", layer, prepared[0].engine),
            layer,
        )
        for s, prepared in splits.items()
    }


def split_acts(prepared: list[Prepared], d: int) -> tuple[Tensor, Tensor]:
    """(resid_mid, real mlp_out) of base and source prompts of augmented batches, stacked."""
    mids = [m for p in prepared for m in (p.source_act[:, 2 * d :], p.source_act[:, d : 2 * d])]
    outs = [o for p in prepared for o in (p.base_act, p.source_act[:, :d])]
    return torch.cat(mids), torch.cat(outs)


def train_random_das(
    model, train: list[Prepared], test: list[Prepared], layer: int, mlp: RandomMLP,
    method: DictConfig, seed: int, progress: bool = True,
) -> tuple[RandomMLPPatch, pd.DataFrame]:  # fmt: skip
    """DAS on the random MLP's hidden acts: the loss, optimiser and schedule of `mlpim.engine.das`."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    patch = RandomMLPPatch(mlp, method.dim, gen).to(train[0].base_act.device)
    desc = f"DAS random MLP L{layer} seed {seed}"
    return patch, fit(model, train, test, patch, method, gen, desc, progress)


def random_mlp_rows(
    cfg: DictConfig, model, aug: dict[str, list[Prepared]], layer: int, seed: int, run_dir: Path
) -> list[dict]:
    """Draw, norm-match and DAS-train one random MLP; its metrics (and output norm) per split."""
    d = model.cfg.d_model
    mlp = matched_random_mlp(model, *split_acts(aug["train"], d), seed)
    patch, history = train_random_das(
        model, aug["train"], aug["test"], layer, mlp, cfg.method, seed
    )
    history.to_csv(run_dir / f"history_random_mlp_seed{seed}.csv", index=False)
    rows = []
    for split, prepared in aug.items():
        mid, _ = split_acts(prepared, d)
        with torch.no_grad():
            values = evaluate(model, prepared, patch) | {"out_norm": mean_norm(mlp(mid))}
        rows += io.metric_rows(values, intervention="random_mlp", site="mlp_out", layer=layer,
                               split=split, seed=seed)  # fmt: skip
    return rows


def real_mlp_rows(
    cfg: DictConfig, model, splits: dict[str, list[Prepared]], aug: dict[str, list[Prepared]],
    layer: int, basis: Tensor,
) -> list[dict]:  # fmt: skip
    """Clean LD and real MLP output norm, the full MLP patch and v_MLP, per split."""
    rows, d = [], model.cfg.d_model
    for split, prepared in splits.items():
        keys = {"site": "mlp_post", "layer": layer, "split": split, "seed": cfg.seed}
        real = {"out_norm": mean_norm(split_acts(aug[split], d)[1])}
        rows += io.metric_rows(clean_metrics(prepared) | real, intervention="clean", **keys)
        for name, setter in (("full", full), ("das", subspace(basis))):
            values = evaluate(model, prepared, setter)
            rows += io.metric_rows(values, intervention=name, **keys)
    return rows


def seed_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (over seeds) and seed count per intervention, split and metric."""
    g = df.groupby(["intervention", "split", "metric"], sort=False).value
    return g.agg(mean="mean", std="std", n="count").reset_index().fillna({"std": 0.0})


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Rows interventions; columns FLDD/IIA mean and std, and mean output norm, per split."""
    stats = seed_stats(df[df.metric.isin(["fldd", "iia", "out_norm"])])
    wide = stats.pivot_table(
        index="intervention", columns=["split", "metric"], values=["mean", "std"], sort=False
    )
    wide = wide.drop(columns=[c for c in wide.columns if c[0] == "std" and c[2] == "out_norm"])
    wide.columns = [f"{m} ({s})" if a == "mean" else f"{m} sd ({s})" for a, s, m in wide.columns]
    return wide[sorted(wide.columns, key=lambda c: (c.split("(")[1], c))]


def plot_bars(df: pd.DataFrame, run_dir: Path, title: str) -> None:
    """FLDD and IIA bars per intervention and split, error bars = std over seeds."""
    stats = seed_stats(df[df.intervention.isin(INTERVENTIONS)])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("fldd", "iia"), strict=True):
        sub = stats[stats.metric == metric]
        mean = sub.pivot_table(index="intervention", columns="split", values="mean")
        std = sub.pivot_table(index="intervention", columns="split", values="std")
        order = [i for i in INTERVENTIONS if i in mean.index]
        mean.loc[order].plot.bar(ax=ax, yerr=std.loc[order], rot=0, capsize=4)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=metric.upper(), xlabel="", ylabel="fraction")
    fig.suptitle(title)
    fig.tight_layout()
    io.save_figure(fig, run_dir, "random_mlp.png")


def summary_markdown(cfg: DictConfig, df: pd.DataFrame, layer: int, n_seeds: int) -> str:
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; MLP layer {layer}; random MLP seeds "
        f"{cfg.seed}..{cfg.seed + n_seeds - 1} (v_MLP: seed {cfg.seed}); mean (sd over seeds)"
        f"\n\n{io.markdown_table(summarize(df))}\n"
    )


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    model = model_for(cfg)
    kind, layer = site_of(cfg, model)
    if kind != "mlp_post":
        raise ConfigError(f"ioi_random_mlp compares with v_MLP at mlp_post, not {kind}")
    splits = paper_splits(cfg, model, "mlp_post", layer)
    basis = das_direction(cfg, model, "mlp_post", layer, cfg.direction, run_dir, splits)
    aug = augmented_splits(model, splits, layer)
    rows = real_mlp_rows(cfg, model, splits, aug, layer, basis)
    n_seeds = int(cfg.extra.get("n_random_seeds", 3))
    for seed in range(cfg.seed, cfg.seed + n_seeds):
        rows += random_mlp_rows(cfg, model, aug, layer, seed, run_dir)
    df = io.tidy(rows, cfg)
    plot_bars(df, run_dir, f"{cfg.model.name}: random MLP vs v_MLP (layer {layer})")
    io.write_text(summary_markdown(cfg, df, layer, n_seeds), run_dir, C.SUMMARY)
    return df
