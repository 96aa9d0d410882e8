"""ioi_path_patching's figure and summary: layer × head heatmaps and the top heads."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from omegaconf import DictConfig

from mlpim.report import io


def _grid(df: pd.DataFrame, name: str, metric: str, layers: list[int]) -> pd.DataFrame:
    sub = df[(df.intervention == name) & (df.metric == metric) & (df.site == "z")]
    return sub.pivot_table(index="layer", columns="head", values="value").reindex(layers)


def _lim(*grids: pd.DataFrame) -> float:
    """Symmetric colour limit shared by `grids`."""
    return max(max(float(abs(g.fillna(0).values).max()) for g in grids), 1e-9)


def _panel(fig, ax, data: pd.DataFrame, title: str, lim: float, label: str) -> None:
    im = ax.imshow(data.values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set(
        xticks=range(data.shape[1]),
        xticklabels=data.columns,
        yticks=range(len(data)),
        yticklabels=data.index,
        xlabel="head",
        ylabel="layer",
    )
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label=label)


def _intervention_row(fig, row, df: pd.DataFrame, name: str, layers, clean) -> None:
    """One row of panels: the DLA with the intervention, its change and the two ΔLD paths."""
    with_ = _grid(df, name, "dla", layers)
    deltas = {
        "dla change (with - without)": with_ - clean,
        "ld via head output": _grid(df, name, "ld_via_head_output", layers),
        "ld via query": _grid(df, name, "ld_via_query", layers),
    }
    _panel(fig, row[0], with_, f"{name}: dla with intervention", _lim(with_, clean), "LD")
    lim = _lim(*deltas.values())
    for ax, (what, grid) in zip(row[1:], deltas.items(), strict=True):
        _panel(fig, ax, grid, f"{name}: {what}", lim, "ΔLD")


def heatmaps(df: pd.DataFrame, run_dir: Path, title: str, first_layer: int) -> None:
    """Layer × head heatmaps: clean DLA, then per intervention its DLA with the intervention,
    the change of DLA, and the ΔLD routed through each head's output and through its query
    (the three ΔLD panels of a row share one colour scale)."""
    layers = sorted(int(v) for v in df[df.site == "z"].layer.unique() if v >= first_layer)
    names = [n for n in df.intervention.unique() if n != "clean"]
    height = (len(names) + 1) * (0.25 * len(layers) + 1.6)
    fig, axes = plt.subplots(
        len(names) + 1, 4, figsize=(17, height), squeeze=False, layout="constrained"
    )
    clean = _grid(df, "clean", "dla", layers)
    _panel(fig, axes[0, 0], clean, "clean: dla (no intervention)", _lim(clean), "LD")
    for ax in axes[0, 1:]:
        ax.axis("off")
    for row, name in zip(axes[1:], names, strict=True):
        _intervention_row(fig, row, df, name, layers, clean)
    fig.suptitle(title)
    io.save_figure(fig, run_dir, "path_patching.png")


def top_heads(df: pd.DataFrame, name: str, metric: str = "ld_via_head_output", n: int = 6) -> str:
    """The n heads with the largest |metric| for an intervention, as 'LlHh (value)'."""
    sub = df[(df.intervention == name) & (df.metric == metric) & (df.site == "z")]
    sub = sub.reindex(sub.value.abs().sort_values(ascending=False).index).head(n)
    return ", ".join(f"L{r.layer}H{r.head} ({r.value:+.3g})" for r in sub.itertuples())


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per intervention: LD, FLDD, IIA, and the sums of the per-head path effects."""
    overall = df[df.site == "logits"].pivot_table(
        index="intervention", columns="metric", values="value", sort=False
    )
    z = df[df.site == "z"].pivot_table(
        index="intervention", columns="metric", values="value", aggfunc="sum", sort=False
    )
    sums = z.drop(columns="dla").add_prefix("sum ")
    return overall.join(sums)


def summary_markdown(cfg: DictConfig, df: pd.DataFrame) -> str:
    """summary.md: the summary table and the top heads of each intervention."""
    lines = [
        f"# {cfg.experiment}\n",
        f"model: {cfg.model.name}; test pairs ABB<->BAB; seed {cfg.seed}\n",
        io.markdown_table(summarize(df)),
        "",
    ]
    for name in [n for n in df.intervention.unique() if n != "clean"]:
        via_query = top_heads(df, name, "ld_via_query")
        lines += [f"- {name}: via head output {top_heads(df, name)}; via query {via_query}"]
    lines += [f"- clean dla: {top_heads(df, 'clean', 'dla')}"]
    return "\n".join(lines) + "\n"
