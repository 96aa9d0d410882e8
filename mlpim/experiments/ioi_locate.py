"""ioi_locate: full-component patching at END (ABB->BAB and BAB->ABB), per layer and per head."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from omegaconf import DictConfig

from mlpim.analysis import landmarks as lmk
from mlpim.engine import metrics
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import patch_each
from mlpim.experiments import Experiment
from mlpim.experiments.common import model_for, predictor
from mlpim.options import IoiLocateOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.tasks import task_splits
from mlpim.tasks.ioi import PairBatch, make_pairs

log = logging.getLogger(__name__)
COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def sites(n_layers: int, n_heads: int) -> list[tuple[str, int, int]]:
    """(kind, layer, head) for every component and head; head -1 = the whole component."""
    comps = [(k, layer, -1) for layer in range(n_layers) for k in COMPONENTS]
    return comps + [("z", layer, h) for layer in range(n_layers) for h in range(n_heads)]


def locate(model, batches: list[PairBatch], engine: str = "auto") -> pd.DataFrame:
    """One row per site and metric: LD, FLDD, IIA and flip rate of the full patch."""
    todo = sites(model.cfg.n_layers, model.cfg.n_heads)
    results, cl = patch_each(model, batches, todo, engine)
    rows = []
    for (kind, layer, h), (ld, hit) in results.items():
        values = {
            "logit_diff": ld.mean().item(),
            "fldd": metrics.fldd(ld, cl),
            "iia": hit.mean().item(),
            "flip_rate": metrics.flip_rate(ld, cl),
        }
        rows += io.metric_rows(values, intervention="full", site=kind, layer=layer, head=h)
    return pd.DataFrame(rows)


def heatmaps(df: pd.DataFrame, run_dir: Path, title: str) -> None:
    """FLDD heatmaps: layer × component and layer × head."""
    fldd = df[(df.metric == "fldd") & (df.split == "test")]
    comp = fldd[fldd["head"] < 0].pivot_table(index="layer", columns="site", values="value")[
        list(COMPONENTS)
    ]
    heads = fldd[fldd.site == "z"].pivot_table(index="layer", columns="head", values="value")
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.25 * len(comp) + 2.5))
    for ax, data, xlabel in ((axes[0], comp, "component"), (axes[1], heads, "head")):
        lim = max(abs(data.values).max(), 1e-6)
        im = ax.imshow(data.values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set(
            xticks=range(data.shape[1]),
            xticklabels=data.columns,
            yticks=range(len(data)),
            yticklabels=data.index,
            xlabel=xlabel,
            ylabel="layer",
        )
        fig.colorbar(im, ax=ax, label="FLDD (1 = LD removed)")
    axes[0].set_title(f"{title}: full patch at END")
    axes[1].set_title("per head (hook_z)")
    io.save_figure(fig, run_dir, "locate.png")


def summarize(df: pd.DataFrame, top: int = 12) -> pd.DataFrame:
    """The sites whose full patch moves LD most (largest |FLDD|)."""
    wide = df.pivot_table(index=["site", "layer", "head"], columns="metric", values="value")
    return wide.reindex(wide.fldd.abs().sort_values(ascending=False).index).head(top)


def pairs_to_patch(cfg: DictConfig, model, n: int) -> list[PairBatch]:
    """IOI: ABB->BAB and BAB->ABB test pairs; any other task: its test pairs."""
    if cfg.dataset.name != "ioi":
        return task_splits(
            model.tokenizer, cfg.dataset, cfg.seed, predictor(model), model.cfg.n_ctx
        )["test"]
    combos = [("ABB", "BAB"), ("BAB", "ABB")]
    return make_pairs(model.tokenizer, cfg.dataset, "test", combos, n, cfg.seed)


def write_landmarks(df: pd.DataFrame, run_dir: Path, model: str, threshold: float) -> str:
    """Apply the landmark rule, write `landmarks.yaml` into `run_dir`; returns a one-line
    description."""
    found = lmk.find_landmarks(df, threshold)
    io.write_text(lmk.landmarks_yaml(found, threshold, model), run_dir, "landmarks.yaml")
    return lmk.landmarks_line(found, threshold)


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Patch every component and head at END; the metrics (and landmarks.yaml for IOI)."""
    opts = options(cfg, Options)
    model = model_for(cfg)
    pairs = pairs_to_patch(cfg, model, opts.n_pairs_per_direction)
    batches = [b.to(model.cfg.device) for b in pairs]
    df = locate(model, batches, cfg.method.engine).assign(split="test")
    df = io.tidy(df.to_dict("records"), cfg)
    what = "ABB<->BAB" if cfg.dataset.name == "ioi" else f"{cfg.dataset.name} test pairs"
    heatmaps(df, run_dir, f"{cfg.model.name}, {what}")
    if cfg.dataset.name == "ioi":  # the landmark rule reads the IOI position signal
        log.info(write_landmarks(df, run_dir, cfg.model.name, opts.signal_threshold))
    return df


EXPERIMENT = Experiment(run=run, options=Options, summarize=summarize)
