"""The pages and figures of illusion_check."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mlpim.analysis import illusion
from mlpim.analysis.checks import ON_VALUE_SCALE
from mlpim.report import io

CHECK_PLOT = "illusion_check.png"
BREAKDOWN = "breakdown.csv"
BREAKDOWN_PLOT = "breakdown.png"
COLORS = {True: "tab:red", False: "tab:green", None: "tab:gray"}


def row_detail(c: illusion.Check, level: float) -> str:
    """One line: the numbers, the rule, the interval, the reference placement."""
    out = c.detail
    if c.rule != illusion.NA and not c.rule.startswith("never"):
        out += f"; {'warns' if c.warning is not None else 'passes'} when {c.rule}"
    if math.isfinite(c.ci[0]):
        out += f"; margin {c.margin:.3g}, {level:.0%} interval [{c.ci[0]:.3g}, {c.ci[1]:.3g}]"
    if c.reference is not None and c.reference.values:
        placed = c.value if c.placed is None else c.placed
        out += f"; {placed:.3g} placed in {c.reference.name}: percentile {c.percentile:.0f}"
    return out


def verdict_markdown(header: str, v: illusion.Verdict, level: float) -> str:
    """The one page to read: the verdict and why, the table, each row's numbers."""
    table = illusion.verdict_table(v).drop(columns=["meaning", "reference", "z"])
    details = "\n".join(f"- **{c.name}** ({c.scope}): {row_detail(c, level)}" for c in v.checks)
    gate = (
        f"FLDD(v) is below the effect gate {v.gate.threshold:.3g}: no effect to explain. "
        if not v.gate.ok
        else ""
    )
    fired = ", ".join(v.warned) or "none"
    notes = ", ".join(v.site_notes) or "none"
    return (
        f"# illusion_check: {v.label}\n\n{header}\n\n{gate}Direction checks that warn: {fired}. "
        f"Site notes (describe the site, never decide): {notes}.\n\n"
        f"Rule (docs/verdict-rule.md): {illusion.rule_sentence()}\n\n"
        f"{io.markdown_table(table)}\n\n{details}\n"
    )


def verdict_plot(v: illusion.Verdict, run_dir: Path, title: str) -> None:
    """One measured check per row: reference dots, value with interval, threshold (dashed)."""
    shown = [c for c in v.checks if math.isfinite(c.value)]
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 0.95 * len(shown) + 0.8), squeeze=False)
    for ax, c in zip(axes[:, 0], shown, strict=True):
        check_row(ax, c)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    io.save_figure(fig, run_dir, CHECK_PLOT)


def check_row(ax, c: illusion.Check) -> None:
    """One row of the check figure, on the check's own scale."""
    same = c.reference is not None and c.name in ON_VALUE_SCALE
    ref = c.reference.finite() if same else np.array([])
    if ref.size:
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, ref.size)
        ax.scatter(ref, jitter, s=8, color="tab:blue", alpha=0.5)
    lo, hi = c.value_ci
    x = c.value if math.isfinite(c.value) else 0.0
    if math.isfinite(lo):
        err = [[max(x - lo, 0.0)], [max(hi - x, 0.0)]]  # a percentile interval may miss x
        ax.errorbar([x], [0], xerr=err, fmt="none", ecolor="k", capsize=3)
    color = "tab:orange" if c.warning and c.scope == "site" else COLORS[c.warning]
    ax.scatter([x], [0], s=60, color=color, zorder=3, marker="D")
    if math.isfinite(c.threshold):
        ax.axvline(c.threshold, color="k", ls="--", lw=1)
    ax.set_yticks([])
    ax.set_ylim(-0.5, 0.5)
    ax.set_ylabel(c.name.replace("_", " "), rotation=0, ha="right", va="center", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(
        f"{c.value:.3g} vs {c.threshold:.3g} ({illusion.warning_word(c)}; {c.scope})",
        fontsize=7,
        loc="right",
    )


def combination(coef: pd.Series, most: int = 3) -> str:
    """A direction in V's columns: its largest `most` coefficients, e.g. +0.71·v1 −0.71·v2."""
    top = coef.abs().sort_values(ascending=False).index[:most]
    terms = " ".join(f"{coef[c]:+.2f}·{c.removeprefix('coef_')}" for c in top)
    return terms + (" …" if len(coef) > most else "")


def check_cell(row: pd.Series, name: str) -> str:
    """A check in one cell: value vs threshold (warning word), or n.a."""
    word = row[f"{name}_warning"]
    if row[name] != row[name]:
        return word
    return f"{row[name]:.3g} vs {row[f'{name}_threshold']:.3g} ({word})"


def breakdown_markdown(table: pd.DataFrame, level: float) -> str:
    """The section "Which part of V does it": one row per principal direction of V's movement."""
    names = [c.removesuffix("_warning") for c in table if c.endswith("_warning")]
    coef = table[[c for c in table if c.startswith("coef_")]]
    cells = pd.DataFrame(index=pd.Index(table.direction, name="direction"))
    cells["in V's columns"] = [combination(r) for _, r in coef.iterrows()]
    cells["share of movement"] = table.share.to_numpy()
    cells[f"FLDD [{level:.0%}]"] = [
        f"{r.fldd:.3f} [{r.fldd_low:.3f}, {r.fldd_high:.3f}]" for r in table.itertuples()
    ]
    cells["gate"] = [f"{r.effect_threshold:.3g} ({r.effect_warning})" for r in table.itertuples()]
    cells["‖null‖²"] = table.null_norm_sq.to_numpy()
    for name in (n for n in names if n != "effect"):  # the gate's value is the FLDD
        cells[name] = [check_cell(r, name) for _, r in table.iterrows()]
    return (
        "\n## Which part of V does it\n\nV's principal directions of the patched movement on the "
        "test pairs (u1 carries the largest share), each patched alone. A table, not a verdict per "
        f"direction: the verdict above is V's.\n\n{io.markdown_table(cells)}\n"
    )


def breakdown_plot(table: pd.DataFrame, run_dir: Path, title: str) -> None:
    """Per principal direction: its share of V's movement and its FLDD (interval; the gate)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 0.35 * len(table) + 1.8), sharey=True)
    y = np.arange(len(table))
    left.barh(y, table.share, color="tab:blue")
    left.set(yticks=y, yticklabels=table.direction, xlabel="share of the patched movement")
    err = [
        (table.fldd - table.fldd_low).clip(lower=0),
        (table.fldd_high - table.fldd).clip(lower=0),
    ]
    right.barh(y, table.fldd, xerr=err, color="tab:red", capsize=2)
    right.axvline(float(table.effect_threshold.iloc[0]), color="k", ls="--", lw=1)
    right.set(xlabel="FLDD (dashed: the gate)")
    left.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, run_dir, BREAKDOWN_PLOT)
