"""toy_illusion's report: the markdown tables (toy_tables.md) and the three-panel figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from mlpim.analysis import toy
from mlpim.report import io

CATEGORY_COLORS = {"e1": "tab:blue", "illusory": "tab:red", "other": "tab:gray", "failed": "k"}


def patch_sections(model: toy.ToyModel) -> list[str]:
    """The post's two patching tables and the full hidden patch, as markdown sections."""
    tables = toy.post_tables(model)
    full = toy.patch_table(toy.patch_pairs(model, toy.full_basis(model.d)))
    return [
        "## The post's tables (W_in = (1, 1, 0), W_out = (1, 0, 2))",
        "### Patching along e1\n\n" + tables["e1"],
        "### Patching along v = (e2 + e3)/√2\n\n" + tables["v_illusory"],
        "### Full patch of the hidden layer (not in the post)\n\n" + full,
    ]


def classification_section(standard: pd.DataFrame, rotated: pd.DataFrame) -> str:
    """The correlated / causal tables of the standard and the rotated basis."""
    return (
        "## Correlated / causal, measured\n\nStandard basis:\n\n"
        + toy.classification_table(standard)
        + "\n\nThe appendix's rotated basis:\n\n"
        + toy.classification_table(rotated)
    )


def _hidden_panel(ax, model: toy.ToyModel) -> None:
    """The data's hidden activations and where the e1 and v patches move them (3-D)."""
    data = model.hidden(toy.vec(*toy.XS))
    ax.scatter(*data.T.tolist(), c="k", s=50, label="data h(x), x = ±1")
    for name, color in (("e1", "tab:blue"), ("v_illusory", "tab:red")):
        for i, p in enumerate(toy.patch_pairs(model, toy.post_directions()[name])):
            (a, b) = p.hidden_before.tolist(), p.hidden_after.tolist()
            step = [y - x for x, y in zip(a, b, strict=True)]
            ax.quiver(*a, *step, color=color, arrow_length_ratio=0.15)
            ax.scatter(*b, c=color, s=40, label=f"after patch along {name}" if i == 0 else None)
    ax.set(
        xlabel="e1 (real)",
        ylabel="e2 (irrelevant)",
        zlabel="e3 (dormant)",
        title="hidden activation: patch along e1 vs v",
    )
    ax.legend(fontsize=7, loc="upper left")


def _seeds_panel(ax, seeds: pd.DataFrame) -> None:
    """|cos(u, e1)| of every DAS restart, sorted, coloured by what it landed on."""
    s = seeds.sort_values("abs_cos_e1").reset_index(drop=True)
    ax.bar(s.index, s.abs_cos_e1, color=[CATEGORY_COLORS[c] for c in s.category])
    ax.axhline(0.9, ls="--", c="k", lw=0.8)
    for cat, color in CATEGORY_COLORS.items():
        n = int((s.category == cat).sum())
        if n:
            ax.bar([0], [0], color=color, label=f"{cat} ({n})")
    ax.set(
        xlabel="DAS seed (sorted)",
        ylabel="|cos(u, e1)|",
        ylim=(0, 1.05),
        title=f"DAS on the toy: {len(s)} seeds, all IIA = {s.iia.min():.0%}",
    )
    ax.legend(fontsize=8)


def _higher_dim_panel(ax, hd: pd.DataFrame) -> None:
    """The output after each patch in the k-dim construction, per k."""
    wide = hd.pivot_table(index="intervention", columns="k", values="output_after", sort=False)
    wide.plot.bar(ax=ax, rot=20)
    ax.axhline(0, c="k", lw=0.6)
    ax.set(
        ylabel="output after patch into x=1 from x'=−1",
        xlabel="",
        title="k irrelevant + k dormant + 1 real neuron",
    )
    ax.legend(title="k", fontsize=8)


def plot(model: toy.ToyModel, seeds: pd.DataFrame, hd: pd.DataFrame, run_dir: Path) -> None:
    """(a) hidden activations before/after the e1 and v patches; (b) DAS solutions' |cos e1|
    per seed; (c) output after each patch in the k-dim construction."""
    fig = plt.figure(figsize=(17, 4.8))
    _hidden_panel(fig.add_subplot(1, 3, 1, projection="3d"), model)
    _seeds_panel(fig.add_subplot(1, 3, 2), seeds)
    _higher_dim_panel(fig.add_subplot(1, 3, 3), hd)
    fig.tight_layout()
    io.save_figure(fig, run_dir, "toy_illusion.png")
