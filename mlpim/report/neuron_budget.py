"""ioi_neuron_budget's summary table, summary.md and figure (FLDD and IIA vs n)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mlpim.analysis.budget import das_test
from mlpim.report import io


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Rows n; columns test FLDD, IIA, LD; the full patch as its own row."""
    sel = df[(df.split == "test") & df.metric.isin(["fldd", "iia", "logit_diff"])]
    sel = sel[sel.intervention.str.startswith("das_n") | (sel.intervention == "full")]
    sel = sel.astype({"n_neurons": int})
    return sel.pivot_table(
        index=["intervention", "n_neurons"], columns="metric", values="value", sort=False
    ).sort_index(level="n_neurons")


def summary_markdown(cfg: DictConfig, subset: str, df: pd.DataFrame, kind: str, layer: int) -> str:
    """summary.md: the table per n and the linear fit, next to the paper's finding."""
    table = summarize(df).reset_index(level="n_neurons")
    fit = df[df.intervention == "fldd_vs_n_fit"].set_index("metric").value
    line = (
        f"FLDD ≈ {fit.slope:.3g}·n + {fit.intercept:.3g} (R² of the fit {fit.r2_fit:.3f})"
        if len(fit)
        else "no fit (one n)"
    )
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; site: {kind}, layer {layer}; k = "
        f"{cfg.method.dim}; subset: {subset}; epochs {cfg.method.epochs}; seed "
        f"{cfg.seed}\n\n{io.markdown_table(table)}\n\n{line}\n\nPaper (GPT-2 MLP8): FLDD grows "
        "linearly with n.\n"
    )


def budget_plot(df: pd.DataFrame, run_dir: Path, title: str) -> None:
    """Test FLDD and IIA vs n with the fitted line and the full-patch FLDD."""
    fldd, iia = das_test(df, "fldd"), das_test(df, "iia")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(fldd.index, fldd, "o-", color="tab:red", label="FLDD (test)")
    ax.plot(iia.index, iia, "s-", color="tab:blue", label="IIA (test)")
    fit = df[df.intervention == "fldd_vs_n_fit"].set_index("metric").value
    if len(fit):
        xs = np.linspace(0, fldd.index.max(), 50)
        ax.plot(xs, fit.slope * xs + fit.intercept, "r:", label=f"linear fit (R² {fit.r2_fit:.2f})")
    full_fldd = df[(df.intervention == "full") & (df.metric == "fldd")].value
    if len(full_fldd):
        ax.axhline(full_fldd.iloc[0], color="gray", ls="--", label="full MLP patch FLDD")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="neurons n available to DAS", ylabel="fraction", title=title)
    ax.legend(fontsize=8)
    io.save_figure(fig, run_dir, "neuron_budget.png")
