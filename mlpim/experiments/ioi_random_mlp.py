"""ioi_random_mlp: DAS finds an IOI subspace even in a random MLP placed where the middle MLP is.

A random MLP f(x) = W2 act(W1 norm(x) + b1) + b2 (the real MLP's widths and activation) reads the
real MLP's input, resid_mid at END; W2, b2 are scaled so that its mean output norm on the training
prompts equals the real MLP's. DAS trains a direction v in its hidden activations h; the patch
adds f(h') - f(h_base) = W2 (h' - h_base), h' = h_base + ((h_src - h_base)·v) v, to the real MLP
output. Its FLDD/IIA are compared with v_MLP's (DAS in the real MLP) and the full MLP patch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from omegaconf import DictConfig
from torch import Tensor

from mlpim import constants as C
from mlpim.analysis.controls import (
    augmented_splits,
    mean_norm,
    random_mlp_history_name,
    random_mlp_run,
    split_acts,
)
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import Prepared, clean_metrics, evaluate
from mlpim.engine.patching import full, subspace
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import das_basis, das_settings, model_for, paper_splits, site_of
from mlpim.options import IoiRandomMlpOptions as Options
from mlpim.options import options
from mlpim.report import io

log = logging.getLogger(__name__)

INTERVENTIONS = ("full", "das", "random_mlp")


def real_mlp_rows(
    cfg: DictConfig,
    model,
    splits: dict[str, list[Prepared]],
    aug: dict[str, list[Prepared]],
    layer: int,
    basis: Tensor,
) -> list[dict]:
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
    """summary.md: which MLP and seeds, and the mean (sd) table."""
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; MLP layer {layer}; random MLP seeds "
        f"{cfg.seed}..{cfg.seed + n_seeds - 1} (v_MLP: seed {cfg.seed}); mean (sd over seeds)"
        f"\n\n{io.markdown_table(summarize(df))}\n"
    )


def random_rows(cfg: DictConfig, model, aug: dict, layer: int, n_seeds: int, run_dir: Path):
    """Each random MLP's rows (seeds seed..seed+n-1); their DAS histories written to run_dir."""
    rows = []
    for seed in range(cfg.seed, cfg.seed + n_seeds):
        new, history = random_mlp_run(model, aug, layer, seed, das_settings(cfg))
        io.write_csv(history, run_dir, random_mlp_history_name(seed))
        rows += new
    return rows


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """v_MLP, the full patch and DAS in random MLPs at the same place; the tidy metrics."""
    n_seeds = options(cfg, Options).random_mlp_seeds
    model = model_for(cfg)
    kind, layer = site_of(cfg, model)
    if kind != "mlp_post":
        raise ConfigError(f"ioi_random_mlp compares with v_MLP at mlp_post, not {kind}")
    splits = paper_splits(cfg, model, "mlp_post", layer)
    basis = das_basis(cfg, model, "mlp_post", layer, directions.get("direction"), run_dir, splits)
    aug = augmented_splits(model, splits, layer)
    rows = real_mlp_rows(cfg, model, splits, aug, layer, basis)
    rows += random_rows(cfg, model, aug, layer, n_seeds, run_dir)
    df = io.tidy(rows, cfg)
    plot_bars(df, run_dir, f"{cfg.model.name}: random MLP vs v_MLP (layer {layer})")
    io.write_text(summary_markdown(cfg, df, layer, n_seeds), run_dir, C.SUMMARY)
    return df


EXPERIMENT = Experiment(run=run, options=Options, summarize=summarize)
