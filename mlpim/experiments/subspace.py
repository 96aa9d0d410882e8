"""ioi_mlp8_das / ioi_resid8_das / ioi_mean_diff: a subspace at one site vs the full-component patch."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from omegaconf import DictConfig

from mlpim import constants as C
from mlpim.analysis.controls import loaded_basis, mean_diff_direction  # noqa: F401
from mlpim.engine.das import train_das
from mlpim.engine.interventions import Prepared, clean_metrics, evaluate
from mlpim.engine.models import ConfigError
from mlpim.engine.patching import full, subspace
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.experiments.common import model_for, paper_splits, site_of, site_width
from mlpim.report import io

log = logging.getLogger(__name__)


def saved_or_trained(
    cfg: DictConfig, model, kind: str, layer: int, path: str | None, *, history: Path,
    save_as: Path, splits: dict[str, list[Prepared]] | None = None,
) -> torch.Tensor:  # fmt: skip
    """A DAS basis (d×k) at (kind, layer): loaded from `path`, else trained on the paper's pairs.

    A trained basis is saved at `save_as` (reusable as `direction=`), its history at `history`.
    """
    d = site_width(model, kind)
    if path:
        return loaded_basis(path, kind, layer, d, model).to(model.cfg.device)
    if cfg.method.dim > d:
        raise ConfigError(f"method.dim={cfg.method.dim} exceeds the width {d} of {kind}")
    splits = splits or paper_splits(cfg, model, kind, layer)
    rot, hist = train_das(model, splits["train"], splits["test"], cfg.method, cfg.seed)
    history.parent.mkdir(parents=True, exist_ok=True)
    hist.to_csv(history, index=False)
    basis = rot.basis.detach()
    save_subspace(save_as, basis, **direction_meta(model, cfg.model, kind, layer),
                  k=basis.shape[1], seed=cfg.seed, method="das")  # fmt: skip
    return basis


def subspace_cosine(v: torch.Tensor, basis: torch.Tensor) -> float:
    """|cos| between unit vector v (d×1) and its projection on span(basis); k=1: plain |cos|."""
    return (basis.T @ v).norm().item()


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


def find_basis(cfg, model, train, test, kind, layer, run_dir, method: str) -> torch.Tensor:
    """The basis for `method`: loaded (`direction=`), DAS-trained, or mean difference."""
    d = train[0].base_act.shape[-1]
    if cfg.method.dim > d:
        raise ConfigError(f"method.dim={cfg.method.dim} exceeds the width {d} of {kind}")
    if method == "mean_diff":
        return mean_diff_direction(train)
    if cfg.direction:
        return loaded_basis(cfg.direction, kind, layer, d, model)
    rot, history = train_das(model, train, test, cfg.method, cfg.seed)
    history.to_csv(run_dir / C.HISTORY, index=False)
    return rot.basis.detach()


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    model = model_for(cfg)
    kind, layer = site_of(cfg, model)
    if cfg.method.name not in ("das", "mean_diff"):
        raise ConfigError(f"method {cfg.method.name!r} finds no subspace; use das or mean_diff")
    splits = paper_splits(cfg, model, kind, layer)
    found = {
        "das": find_basis(cfg, model, splits["train"], splits["test"], kind, layer, run_dir, "das")
    }
    if cfg.method.name == "mean_diff":
        found["mean_diff"] = find_basis(
            cfg, model, splits["train"], None, kind, layer, run_dir, "mean_diff"
        )
    keys = {"site": kind, "layer": layer, "dim": cfg.method.dim, "seed": cfg.seed}
    rows = []
    for split, prepared in splits.items():
        rows += io.metric_rows(clean_metrics(prepared), intervention="clean", split=split, **keys)
        setters = {"full": full} | {
            n: subspace(b.to(prepared[0].base_act)) for n, b in found.items()
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
    save_subspace(
        run_dir / C.DIRECTION, found[method], **direction_meta(model, cfg.model, kind, layer),
        k=found[method].shape[1], seed=cfg.seed, method=method, metrics=test.to_dict(),
    )  # fmt: skip
    io.write_text(summary_markdown(cfg, df, kind, layer), run_dir, C.SUMMARY)
    table1_plot(df, run_dir, f"{cfg.experiment}: {cfg.model.name}, {kind} L{layer}")
    return df


def summary_markdown(cfg: DictConfig, df: pd.DataFrame, kind: str, layer: int) -> str:
    table = io.summary_table(df[df.metric != "cosine_with_das"])
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; site: {kind}, layer {layer}; "
        f"k = {cfg.method.dim}; seed {cfg.seed}\n\n{io.markdown_table(table)}\n"
    )
