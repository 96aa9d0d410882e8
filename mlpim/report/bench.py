"""The pages and figures of illusion_benchmark: one run's, or several runs' merged (`merged`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mlpim.analysis import bench_table as T
from mlpim.analysis import illusion
from mlpim.report import io

CONFUSION_PLOT = "confusion.png"
ROC_PLOT = "roc.png"
SCORE_PLOT = "scores.png"
CASE_COLUMNS = ["layer", "kind", "truth", "fldd", "gate_pos", "label", "score", "warned", "m"]
TRUTH_COLORS = {"illusory": "tab:red", "real": "tab:blue"}


def rates_markdown(table: pd.DataFrame, k_dim: bool = False) -> str:
    """The rates per model × task and pooled, each k/n with its exact 95% interval."""
    rates = T.rates_table(table, k_dim)
    fmt = lambda r, key: (  # noqa: E731
        f"{r[f'{key}_k']}/{r[f'{key}_n']} = {r[key]:.2f} [{r[f'{key}_low']:.2f}, "
        f"{r[f'{key}_high']:.2f}]"
        if r[f"{key}_n"]
        else "0/0 (undefined)"
    )
    out = pd.DataFrame(
        {
            "model": rates.model,
            "task": rates.task,
            "split": rates.split,
            "illusions flagged (above the gate)": [
                fmt(r, "detection") for _, r in rates.iterrows()
            ],
            "of those, m > 2 (the principle's illusions)": [
                fmt(r, "detection_m") for _, r in rates.iterrows()
            ],
            "real MLP called illusory (above the gate)": [
                fmt(r, "false_positive") for _, r in rates.iterrows()
            ],
            "AUC (MLP, above the gate)": rates.auc.round(3),
        }
    )
    return io.markdown_table(out.set_index("model"))


def coverage_markdown(table: pd.DataFrame) -> str:
    """How many 1-D MLP cases lie above the gate, and how hard they are, per model × task."""
    cov = T.coverage(table)
    part = lambda k, n: f"{k}/{n} = {k / n:.2f}" if n else "0/0"  # noqa: E731
    out = pd.DataFrame(
        {
            "model": cov.model,
            "task": cov.task,
            "split": cov.split,
            "illusions above the gate": cov.illusions,
            "of those, within twice the gate": [
                part(k, n) for k, n in zip(cov.near_gate, cov.illusions, strict=True)
            ],
            "real MLP above the gate": cov.real,
            "of those, hard negatives": [
                part(k, n) for k, n in zip(cov.hard, cov.real, strict=True)
            ],
        }
    )
    return io.markdown_table(out.set_index("model"))


def kinds_markdown(table: pd.DataFrame) -> str:
    """Per kind and truth: how many cases lie above, at and below the gate, and how many of those
    above were called likely illusory."""
    lm = T.scored(table)
    lm = lm.assign(flagged=lm.label == illusion.LIKELY_ILLUSORY)
    g = lm.groupby(["kind", "truth"])
    out = pd.DataFrame(
        {
            "above": g.gate_pos.apply(lambda s: int((s == T.ABOVE).sum())),
            "holds": g.gate_pos.apply(lambda s: int((s == T.HOLDS).sum())),
            "below": g.gate_pos.apply(lambda s: int((s == T.BELOW).sum())),
            "above, called likely illusory": g.apply(
                lambda d: int((d.flagged & (d.gate_pos == T.ABOVE)).sum()), include_groups=False
            ),
        }
    )
    return io.markdown_table(out)


def refused_markdown(table: pd.DataFrame) -> str:
    """The refused edits (counted, never scored)."""
    ref = table[table.refused.astype(bool)]
    if not len(ref):
        return "none"
    cols = [c for c in ("model", "task", "case", "layer", "reason") if c in ref.columns]
    return io.markdown_table(ref[cols].set_index("case"))


def markdown(header: str, table: pd.DataFrame) -> str:
    """One run's page: rates, per-kind counts, confusion matrix, misses, refused edits, cases."""
    miss = T.misses(table)
    cases = T.scored(table)
    return (
        f"# illusion_benchmark\n\n{header}\n\n## Rates\n\n{rates_markdown(table)}\n\n"
        "A case counts in a rate only when its effect's whole 95% interval lies above the gate "
        "(MLP sites); a case whose interval holds the gate is in neither rate.\n\n"
        f"### Planted k-dim subspaces (beside, never pooled)\n\n{rates_markdown(table, True)}\n\n"
        f"## Coverage\n\n{coverage_markdown(table)}\n\n"
        "Directions only (k = 1). The benchmark aims at 60 or more cases a side per model, with at "
        "least a third of the illusions within twice the gate (where detection is hard) and at "
        "least a third of the real cases hard negatives.\n\n"
        f"## Cases by kind\n\n{kinds_markdown(table)}\n\n"
        f"## Confusion matrix\n\n{io.markdown_table(T.confusion(table))}\n\n"
        f"## Misses (above the gate)\n\n"
        f"{io.markdown_table(miss.set_index('case')) if len(miss) else 'none'}\n\n"
        f"## Refused edits\n\n{refused_markdown(table)}\n\n## Cases\n\n"
        f"{io.markdown_table(cases.set_index('case')[[c for c in CASE_COLUMNS if c in cases]])}\n"
    )


def plots(table: pd.DataFrame, run_dir: Path, title: str) -> None:
    """The confusion matrix, the ROC curve and the FLDD × score scatter."""
    confusion_plot(T.confusion(table), run_dir, f"{title}: planted truth × verdict")
    fpr, tpr = T.roc_curve(table)
    auc = T.rates(table)["auc"]["value"]
    roc_plot(fpr, tpr, auc, run_dir, f"{title}: illusion score (MLP, above the gate)")
    score_plot(T.scored(table), run_dir, title)


def confusion_plot(conf: pd.DataFrame, run_dir: Path, title: str) -> None:
    """The confusion matrix, planted truth × verdict (borderline its own column)."""
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(conf) + 1.8))
    ax.imshow(conf.values, cmap="Blues", aspect="auto")
    ax.set(xticks=range(conf.shape[1]), yticks=range(conf.shape[0]))
    ax.set_xticklabels(conf.columns, rotation=20, fontsize=8)
    ax.set_yticklabels(conf.index, fontsize=7)
    for (i, j), n in np.ndenumerate(conf.values):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=9)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, run_dir, CONFUSION_PLOT)


def roc_plot(fpr: np.ndarray, tpr: np.ndarray, auc: float, run_dir: Path, title: str) -> None:
    """The ROC curve of the illusion score."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(fpr, tpr, drawstyle="steps-post", color="tab:red", label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    ax.set(
        xlabel="real MLP called (false-positive rate)",
        ylabel="illusions called (true-positive rate)",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    io.save_figure(fig, run_dir, ROC_PLOT)


def score_plot(cases: pd.DataFrame, run_dir: Path, title: str) -> None:
    """FLDD against the illusion score per MLP case, coloured by truth: where the misses sit."""
    mlp = cases[cases.site == "mlp_post"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for truth, g in mlp.groupby("truth"):
        ax.scatter(
            g.fldd,
            g.score.clip(-10, 10),
            s=12,
            alpha=0.7,
            label=truth,
            color=TRUTH_COLORS.get(truth, "gray"),
        )
    if len(mlp):
        ax.axvline(float(mlp.gate.median()), color="gray", ls=":", lw=1, label="gate")
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="FLDD (test pairs)", ylabel="illusion score (clipped at ±10)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, run_dir, SCORE_PLOT)
