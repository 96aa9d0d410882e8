"""ioi_mlp8_das / ioi_resid8_das / ioi_mean_diff: a subspace at one site vs the full-component patch."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from mlpim import constants as C
from mlpim.analysis.controls import mean_diff_direction
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import clean_metrics, evaluate
from mlpim.engine.patching import full, subspace
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import model_for, model_spec, paper_splits, saved_or_trained, site_of
from mlpim.options import NoOptions, options
from mlpim.report import io
from mlpim.report.plots import table1_plot

log = logging.getLogger(__name__)


def subspace_cosine(v: torch.Tensor, basis: torch.Tensor) -> float:
    """|cos| between unit vector v (d×1) and its projection on span(basis); k=1: plain |cos|."""
    return (basis.T @ v).norm().item()


def find_basis(
    cfg, model, splits, kind: str, layer: int, run_dir: Path, method: str, given: Direction | None
):
    """The basis for `method`: the mean difference, or DAS (loaded with `direction=`, else
    trained; history and basis saved in the run directory)."""
    if method == "mean_diff":
        return mean_diff_direction(splits["train"])
    history, save_as = run_dir / C.HISTORY, run_dir / C.DIRECTION
    return saved_or_trained(
        cfg, model, kind, layer, given, history=history, save_as=save_as, splits=splits
    )


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """The subspace found at the site, next to the full patch, on train and test; the metrics."""
    options(cfg, NoOptions)
    model = model_for(cfg)
    kind, layer = site_of(cfg, model)
    if cfg.method.name not in ("das", "mean_diff"):
        raise ConfigError(f"method {cfg.method.name!r} finds no subspace; use das or mean_diff")
    splits = paper_splits(cfg, model, kind, layer)
    methods = ["das"] + (["mean_diff"] if cfg.method.name == "mean_diff" else [])
    given = directions.get("direction")
    found = {m: find_basis(cfg, model, splits, kind, layer, run_dir, m, given) for m in methods}
    keys = {"site": kind, "layer": layer, "dim": cfg.method.dim, "seed": cfg.seed}
    rows = []
    for split, prepared in splits.items():
        rows += io.metric_rows(clean_metrics(prepared), intervention="clean", split=split, **keys)
        setters = {"full": full} | {
            n: subspace(b.to(prepared[0].base_act.device)) for n, b in found.items()
        }
        for name, setter in setters.items():
            values = evaluate(model, prepared, setter)
            rows += io.metric_rows(values, intervention=name, split=split, **keys)
    if "mean_diff" in found:
        cos = subspace_cosine(found["mean_diff"], found["das"])
        rows += io.metric_rows(
            {"cosine_with_das": cos}, intervention="mean_diff", split="train", **keys
        )
    df = io.tidy(rows, cfg)
    method = cfg.method.name
    test = df[(df.split == "test") & (df.intervention == method)].set_index("metric").value
    meta = direction_meta(model, model_spec(cfg), kind, layer)
    basis, k = found[method], found[method].shape[1]
    path = run_dir / C.DIRECTION
    save_subspace(path, basis, **meta, k=k, seed=cfg.seed, method=method, metrics=test.to_dict())
    io.write_text(summary_markdown(cfg, df, kind, layer), run_dir, C.SUMMARY)
    table1_plot(df, run_dir, f"{cfg.experiment}: {cfg.model.name}, {kind} L{layer}")
    return df


def summary_markdown(cfg: DictConfig, df: pd.DataFrame, kind: str, layer: int) -> str:
    """summary.md: the site, k and the table of interventions (without the cosine row)."""
    table = io.summary_table(df[df.metric != "cosine_with_das"])
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; site: {kind}, layer {layer}; "
        f"k = {cfg.method.dim}; seed {cfg.seed}\n\n{io.markdown_table(table)}\n"
    )


EXPERIMENT = Experiment(run=run, options=NoOptions)
