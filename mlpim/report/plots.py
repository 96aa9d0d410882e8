"""Plots shared by several experiments."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from mlpim.report import io


def table1_plot(df: pd.DataFrame, run_dir: Path, title: str) -> None:
    """Bars of FLDD and IIA per intervention on the test pairs, laid out like the paper's Table 1."""
    test = df[(df.split == "test") & df.metric.isin(["fldd", "iia"])]
    wide = test.pivot_table(index="intervention", columns="metric", values="value", sort=False)
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    wide.plot.bar(ax=ax, rot=0, color=["tab:red", "tab:blue"])
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(1, color="gray", lw=0.8, ls="--")
    ax.set(title=title, ylabel="fraction (FLDD > 1: prediction flipped)", xlabel="")
    io.save_figure(fig, run_dir, "interventions.png")
