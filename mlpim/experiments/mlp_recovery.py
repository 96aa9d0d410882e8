"""mlp_recovery: the paper's appendix probes of how much of the MLP's input its activations carry.

Ridge: held-out R² of predicting resid_mid·v (random unit v) from the MLP post-activations, per
layer (GPT-2 small: 0.71 ± 0.17 over layers). Logistic: held-out accuracy of detecting the sign
of ±z·v·‖resid_mid‖ added to resid_mid from the recomputed MLP activations, per layer and z
(GPT-2 small, mean over layers: 1e-4 → 0.69, 1e-3 → 0.83, 1e-2 → 0.87, 1e-1 → 0.996).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

from mlpim.analysis import recovery as R
from mlpim.engine.direction import Direction
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import model_for, seed_everything
from mlpim.options import MlpRecoveryOptions as Options
from mlpim.options import options
from mlpim.report import io

log = logging.getLogger(__name__)
PAPER_R2 = (0.71, 0.17)
PAPER_ACC = {1e-4: 0.69, 1e-3: 0.83, 1e-2: 0.87, 1e-1: 0.996}


def layers_of(extra: Options, n_layers: int) -> list[int]:
    """`extra.layers`, else every `extra.layer_step`-th layer from 0 plus the last one."""
    if extra.layers is not None:
        layers = sorted({int(L) for L in extra.layers})
    else:
        layers = sorted(set(range(0, n_layers, int(extra.layer_step))) | {n_layers - 1})
    if not layers or not 0 <= layers[0] <= layers[-1] < n_layers:
        raise ConfigError(f"extra.layers={layers} must lie within 0..{n_layers - 1}")
    return layers


def ridge_rows(acts: R.Activations, dirs: torch.Tensor, train, test) -> list[dict]:
    """One R² row per layer and direction."""
    rows = []
    for layer, post in acts.post.items():
        for j, r2 in enumerate(R.ridge_r2(post, acts.mid[layer] @ dirs, train, test)):
            rows += io.metric_rows(
                {"r2": float(r2)},
                intervention="ridge",
                site="mlp_post",
                layer=layer,
                split="test",
                direction=j,
            )
    return rows


def logistic_rows(model, ex: Options, acts, tokens, pos, train, test, gen) -> list[dict]:
    """One accuracy row per layer, z and direction; MLP activations recomputed per perturbation."""
    rows = []
    signs = R.balanced_signs(len(pos.flatten()), train, test)
    for layer, mid in acts.mid.items():
        for j, v in enumerate(R.random_directions(mid.shape[1], ex.n_logistic_directions, gen).T):
            for z in ex.z_values:
                delta = R.perturbation(mid, v, float(z), signs, ex.norm_scale)
                post = (
                    R.post_from_mid(model, layer, mid + delta)
                    if ex.fast
                    else R.post_with_hook(model, tokens, pos, layer, delta, ex.batch_size)
                )
                acc = R.logistic_accuracy(post, signs, train, test, ex.logistic_c)
                rows += io.metric_rows(
                    {"accuracy": acc},
                    intervention="logistic",
                    site="mlp_post",
                    layer=layer,
                    split="test",
                    direction=j,
                    z=float(z),
                )
            log.info("logistic layer %d direction %d done", layer, j)
    return rows


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Ridge and logistic probes over the corpus at each layer; the tidy metrics."""
    ex = options(cfg, Options)
    model = model_for(cfg)
    if ex.chunk_len + 1 > model.cfg.n_ctx:
        raise ConfigError(
            f"extra.chunk_len={ex.chunk_len} plus BOS exceeds {cfg.model.name}'s "
            f"context of {model.cfg.n_ctx} tokens; lower extra.chunk_len"
        )
    gen = seed_everything(cfg.seed)
    tokens = R.corpus_chunks(model.tokenizer, R.corpus_texts(ex.corpus_path), ex.chunk_len)
    chunks, pos = R.sample_positions(
        len(tokens), tokens.shape[1], ex.n_activations, ex.positions_per_chunk, gen
    )
    tokens = tokens[chunks]
    layers = layers_of(ex, model.cfg.n_layers)
    log.info("%d chunks, %d positions, layers %s", len(tokens), pos.numel(), layers)
    acts = R.collect(model, tokens, pos, layers, ex.batch_size)
    train, test = R.split_indices(pos.numel(), ex.n_train, ex.n_activations - ex.n_train, gen)
    dirs = R.random_directions(model.cfg.d_model, ex.n_directions, gen)
    rows = ridge_rows(acts, dirs, train, test)
    rows += logistic_rows(model, ex, acts, tokens, pos, train, test, gen)
    df = io.tidy(rows, cfg)
    r2_plot(df, run_dir, cfg.model.name)
    logistic_plot(df, run_dir, cfg.model.name)
    io.write_text(summary_markdown(cfg, ex, df, layers), run_dir, "summary.md")
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per layer: ridge R² mean and std over directions, logistic accuracy (mean) per z."""
    r2 = df[df.metric == "r2"].groupby("layer").value.agg(r2_mean="mean", r2_std="std")
    acc = df[df.metric == "accuracy"].pivot_table(index="layer", columns="z", values="value")
    acc.columns = [f"acc z={z:g}" for z in acc.columns]
    table = r2.join(acc)
    overall = {
        "r2_mean": df[df.metric == "r2"].value.mean(),
        "r2_std": df[df.metric == "r2"].value.std(),
    } | acc.mean().to_dict()
    return pd.concat([table, pd.DataFrame(overall, index=["all"])])


def summary_markdown(cfg: DictConfig, ex: Options, df: pd.DataFrame, layers: list[int]) -> str:
    """summary.md: the per-layer table and the paper's numbers."""
    table = summarize(df)
    table.index = table.index.map(str)
    table.index.name = "layer"
    paper = ", ".join(f"{z:g} → {a}" for z, a in PAPER_ACC.items())
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; corpus: {ex.corpus_path or 'pydoc_data'}"
        f"; layers {layers}; {ex.n_activations} activations ({ex.n_train} train); "
        f"{ex.n_directions} ridge directions; {ex.n_logistic_directions} logistic direction(s) "
        f"per layer and z; C = {ex.logistic_c:g}; norm scale: {ex.norm_scale}\n\n"
        f"{io.markdown_table(table)}\n\nPaper (GPT-2 small): R² {PAPER_R2[0]} ± {PAPER_R2[1]}; "
        f"logistic accuracy by z: {paper}.\n"
    )


def r2_plot(df: pd.DataFrame, run_dir: Path, model_name: str) -> None:
    """Held-out R² vs layer: one dot per direction, mean ± std line."""
    r2 = df[df.metric == "r2"]
    stats = r2.groupby("layer").value.agg(["mean", "std"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(r2.layer, r2.value, s=12, alpha=0.5, color="tab:blue", label="one direction")
    ax.errorbar(
        stats.index,
        stats["mean"],
        yerr=stats["std"].fillna(0),
        color="k",
        marker="o",
        capsize=3,
        label="mean ± std",
    )
    ax.axhspan(
        PAPER_R2[0] - PAPER_R2[1],
        PAPER_R2[0] + PAPER_R2[1],
        color="gray",
        alpha=0.15,
        label="GPT-2 (paper)",
    )
    ax.set(
        xlabel="layer",
        ylabel="held-out R²",
        ylim=(min(0, r2.value.min()) - 0.05, 1.05),
        title=f"resid_mid·v recovered from MLP activations ({model_name})",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    io.save_figure(fig, run_dir, "recovery_r2.png")


def logistic_plot(df: pd.DataFrame, run_dir: Path, model_name: str) -> None:
    """Held-out accuracy vs z, one line per layer, the paper's means dashed."""
    acc = df[df.metric == "accuracy"].pivot_table(index="z", columns="layer", values="value")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colors = plt.cm.viridis([i / max(1, acc.shape[1] - 1) for i in range(acc.shape[1])])
    for color, layer in zip(colors, acc.columns, strict=True):
        ax.plot(acc.index, acc[layer], marker="o", color=color, label=f"L{layer}")
    ax.plot(list(PAPER_ACC), list(PAPER_ACC.values()), "k--", label="GPT-2 mean (paper)")
    ax.set(
        xscale="log",
        xlabel="z",
        ylabel="held-out accuracy",
        ylim=(0.4, 1.02),
        title=f"detecting ±z·v·‖resid_mid‖ from MLP activations ({model_name})",
    )
    ax.legend(fontsize=7, ncol=2)
    io.save_figure(fig, run_dir, "recovery_logistic.png")


EXPERIMENT = Experiment(
    run=run,
    options=Options,
    summarize=summarize,
    inputs={"extra.corpus_path": None},
    positive=("batch_size",),
)
