"""ioi_baseline: clean logit difference and accuracy per template and split."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from omegaconf import DictConfig

from mlpim.engine import metrics
from mlpim.engine.direction import Direction
from mlpim.engine.patching import logits_end
from mlpim.experiments import Experiment
from mlpim.experiments.common import model_for, require_ioi
from mlpim.options import NoOptions, options
from mlpim.report import io
from mlpim.tasks.ioi import IOIBatch, make_prompts

PATTERNS = ("ABB", "BAB", "ABA", "BAA")


def clean_table(model, batches: list[IOIBatch]) -> pd.DataFrame:
    """One row per prompt: template, pattern, logit difference, correct (argmax is IO)."""
    rows = []
    with torch.no_grad():
        for b in batches:
            logits = logits_end(model, b)
            ld = metrics.logit_diff(logits, b.io, b.s)
            hit = logits.argmax(-1) == b.io
            rows += [
                {"template": t, "pattern": p, "logit_diff": d, "accuracy": float(h)}
                for t, p, d, h in zip(b.template, b.pattern, ld.tolist(), hit.tolist(), strict=True)
            ]
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, run_dir: Path, model_name: str) -> None:
    """Bar plot of LD and accuracy per template, train vs test."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, metric in zip(axes, ["logit_diff", "accuracy"], strict=True):
        sub = df[(df.metric == metric) & (df.template != "all")]
        wide = sub.pivot_table(index="template", columns="split", values="value")
        wide.plot.bar(ax=ax, rot=0)
        ax.set(title=f"{metric} per template ({model_name})", xlabel="template", ylabel=metric)
    io.save_figure(fig, run_dir, "baseline.png")


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Clean LD and accuracy per template and split; the metrics."""
    options(cfg, NoOptions)
    require_ioi(cfg)
    model = model_for(cfg)
    rows = []
    for split in ("train", "test"):
        batches = make_prompts(
            model.tokenizer, cfg.dataset, split, PATTERNS, cfg.dataset.n_eval_prompts, cfg.seed
        )
        per_prompt = clean_table(model, [b.to(model.cfg.device) for b in batches])
        groups = [("all", per_prompt), *per_prompt.groupby("template")]
        for template, g in groups:
            values = {"logit_diff": g.logit_diff.mean(), "accuracy": g.accuracy.mean()}
            rows += io.metric_rows(
                values,
                intervention="clean",
                site="none",
                layer=-1,
                split=split,
                template=str(template),
                n=len(g),
            )
    df = io.tidy(rows, cfg)
    plot(df, run_dir, cfg.model.name)
    return df


EXPERIMENT = Experiment(run=run, options=NoOptions)
