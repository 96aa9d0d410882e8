"""The pages and figures of illusion_check and illusion_benchmark."""

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
CONFUSION_PLOT = "confusion.png"
ROC_PLOT = "roc.png"
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


def benchmark_markdown(
    header: str, conf: pd.DataFrame, rates: dict, misses: pd.DataFrame, table: pd.DataFrame
) -> str:
    """The confusion matrix, the rates, the per-case table (which checks fired), the misses."""
    cols = ["layer", "site", "fldd", "gate", "label", "score", "warned", "site_notes"]
    rate = (
        f"planted illusions above the gate called likely illusory: "
        f"{rates['illusions_flagged']:.0%} of {rates['illusions_above_gate']}; planted real "
        f"directions called likely illusory: {rates['real_called_illusory']} of "
        f"{rates['real']} (real MLP directions above the gate: "
        f"{rates['real_mlp_above_gate']}); AUC of the illusion score {rates['auc']:.3f} "
        f"(illusions above the gate vs real; with every illusion "
        f"{rates['auc_all_illusions']:.3f})"
    )
    miss = io.markdown_table(misses.set_index("case")) if len(misses) else "none"
    return (
        f"# illusion_benchmark\n\n{header}\n\n## Confusion matrix\n\n"
        f"{io.markdown_table(conf)}\n\n{rate}\n\n## Cases\n\n"
        f"{io.markdown_table(table.set_index('case')[cols])}\n\n## Misses\n\n{miss}\n"
    )


def confusion_plot(conf: pd.DataFrame, run_dir: Path, title: str) -> None:
    """The confusion matrix, planted truth × verdict (borderline its own column)."""
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(conf) + 1.8))
    ax.imshow(conf.values, cmap="Blues", aspect="auto")
    ax.set(xticks=range(conf.shape[1]), yticks=range(conf.shape[0]))
    ax.set_xticklabels(conf.columns, rotation=20, fontsize=8)
    ax.set_yticklabels(conf.index, fontsize=8)
    for (i, j), n in np.ndenumerate(conf.values):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=10)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, run_dir, CONFUSION_PLOT)


def roc_plot(fpr: np.ndarray, tpr: np.ndarray, auc: float, run_dir: Path, title: str) -> None:
    """The ROC curve of the illusion score."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(fpr, tpr, drawstyle="steps-post", color="tab:red", label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    ax.set(
        xlabel="planted real called (false-positive rate)",
        ylabel="planted illusions called (true-positive rate)",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, run_dir, ROC_PLOT)
