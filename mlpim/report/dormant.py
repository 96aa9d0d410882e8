"""ioi_dormant's figure, summary table and summary.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mlpim.analysis.dormant import layer_note
from mlpim.report import io


def plot_dormant(raw: pd.DataFrame, run_dir: Path, title: str) -> None:
    """One panel per combo: projection histograms, patched solid, unpatched dashed."""
    combos = list(dict.fromkeys(raw.combo))
    ncols = 4
    nrows = -(-len(combos) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), sharex=True)
    values = np.concatenate([raw.patched, raw.unpatched])
    bins = np.linspace(values.min(), values.max(), 41)
    for ax, combo in zip(np.ravel(axes), combos, strict=False):
        sub = raw[raw.combo == combo]
        same = bool(sub.same_position.iloc[0])
        color = "tab:blue" if same else "tab:red"
        ax.hist(sub.patched, bins=bins, histtype="step", color=color, lw=1.6, label="patched")
        ax.hist(sub.unpatched, bins=bins, histtype="step", color=color, ls="--", label="unpatched")
        ax.axvline(0, color="gray", lw=0.6)
        ax.locator_params(axis="x", nbins=4)
        ax.set_title(f"{combo} ({'same' if same else 'opposite'})", fontsize=9)
    for ax in np.ravel(axes)[len(combos) :]:
        ax.axis("off")
    np.ravel(axes)[0].legend(fontsize=7)
    fig.supxlabel("MLP output at END projected on v_true")
    fig.suptitle(title)
    fig.tight_layout()
    io.save_figure(fig, run_dir, "dormant.png")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per combo: projection mean/std (patched, unpatched), dormant ratio, patch FLDD/IIA."""
    wide = df.pivot_table(
        index="combo", columns=["intervention", "metric"], values="value", sort=False
    )
    cols = {
        ("das", "proj_mean"): "proj patched",
        ("das", "proj_std"): "sd patched",
        ("clean", "proj_mean"): "proj clean",
        ("clean", "proj_std"): "sd clean",
        ("das", "dormant_ratio"): "dormant ratio",
        ("das", "fldd"): "FLDD",
        ("das", "iia"): "IIA",
        ("clean", "logit_diff"): "LD clean",
        ("das", "logit_diff"): "LD",
    }
    out = wide[list(cols)]
    out.columns = list(cols.values())
    return out


def summary_markdown(cfg: DictConfig, df: pd.DataFrame, mlp_layer: int, resid_layer: int) -> str:
    """summary.md: which layers, whether the MLP feeds v_true's residual, the combo table."""
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; v_MLP: mlp_post L{mlp_layer}; "
        f"v_true: resid_post L{resid_layer}; seed {cfg.seed}\n\n{layer_note(mlp_layer, resid_layer)}"
        f"\n\n{io.markdown_table(summarize(df))}\n"
    )
