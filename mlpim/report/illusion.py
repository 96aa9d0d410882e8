"""The pages and figures of illusion_check."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from mlpim.analysis import illusion
from mlpim.analysis.checks import ON_VALUE_SCALE
from mlpim.report import io

CHECK_PLOT = "illusion_check.png"
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
