"""ioi_layer_profile's summary table, summary.md and figure (layers on the x axis)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from omegaconf import DictConfig

from mlpim.report import io

LABEL = {"mlp_post": ("v_MLP", "full MLP"), "resid_post": ("v_resid", "full resid")}


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per layer: test FLDD / IIA / flip rate of each intervention, v_MLP's null share."""
    test = df[(df.split == "test") & (df.intervention != "clean")]
    cols = {}
    for kind, (das, whole) in LABEL.items():
        at = test[test.site == kind]
        for name, label in (("das", das), ("full", whole)):
            wide = at[at.intervention == name].pivot_table(
                index="layer", columns="metric", values="value"
            )
            metrics = ("fldd", "iia", "flip_rate") if name == "das" else ("fldd",)
            cols |= {f"{label} {m.replace('_rate', '')}": wide[m] for m in metrics}
    null = df[df.metric == "null_frac"].set_index("layer").value
    table = pd.DataFrame(cols).assign(**{"v_MLP null frac": null})
    order = sorted(table.columns, key=lambda c: not c.endswith("fldd"))  # FLDD first (stable)
    return table[order].rename_axis("layer")


def summary_markdown(cfg: DictConfig, table: pd.DataFrame, why: str) -> str:
    """summary.md: the per-layer table and how its layers were chosen."""
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; layers from {why}; k = "
        f"{cfg.method.dim}; {cfg.method.epochs} DAS epochs; seed {cfg.seed}; test pairs\n\n"
        f"{io.markdown_table(table)}\n"
    )


STYLES = {
    "v_MLP": "tab:red",
    "full MLP": "tab:orange",
    "v_resid": "tab:blue",
    "full resid": "tab:cyan",
}


def _fldd_panel(ax, table: pd.DataFrame, title: str) -> None:
    """Test FLDD of the four patches over layers."""
    for label, color in STYLES.items():
        ls = "-" if label.startswith("v_") else "--"
        ax.plot(table.index, table[f"{label} fldd"], marker="o", color=color, ls=ls, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(1, color="gray", lw=0.8, ls=":")
    ax.set(title=title, xlabel="layer", ylabel="test FLDD (> 1: prediction flipped)")


def _fraction_panel(ax, table: pd.DataFrame, chance: pd.Series) -> None:
    """IIA and flip rate of both DAS directions, v_MLP's nullspace share and its chance level."""
    x = table.index
    for label in ("v_MLP", "v_resid"):
        color = STYLES[label]
        ax.plot(x, table[f"{label} iia"], marker="o", color=color, label=f"{label} IIA")
        flip = table[f"{label} flip"]
        ax.plot(x, flip, marker="s", color=color, ls="--", label=f"{label} flip rate")
    ax.plot(x, table["v_MLP null frac"], marker="^", color="k", label="v_MLP nullspace share")
    if len(chance):
        ax.axhline(chance.iloc[0], color="gray", lw=0.8, ls=":", label="random direction")
    ax.set(xlabel="layer", ylabel="fraction", ylim=(-0.02, 1.02), title="IIA, flip rate, nullspace")


def profile_plot(df: pd.DataFrame, run_dir: Path, title: str, mid: int | None) -> None:
    """Two panels over layers: FLDD of the four patches; IIA, flip rate and v_MLP's null share
    (`mid`: the model's mlp_in_the_middle landmark, marked when in range)."""
    table = summarize(df)
    x = table.index
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    _fldd_panel(a, table, title)
    _fraction_panel(b, table, df[df.metric == "null_frac_random"].value)
    for ax in (a, b):
        if mid is not None and x.min() <= mid <= x.max():
            ax.axvline(mid, color="gray", lw=0.8, ls="-.", label="mlp_in_the_middle (config)")
        ax.set_xticks(list(x))
        ax.legend(fontsize=7)
    io.save_figure(fig, run_dir, "layer_profile.png")
