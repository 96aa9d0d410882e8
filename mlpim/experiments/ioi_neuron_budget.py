"""ioi_neuron_budget: DAS in the middle MLP restricted to n of its neurons, for n on a log grid.

The basis is zero outside the chosen neurons: an orthonormal n×k `RotatedSubspace` embedded into
d_mlp, so `evaluate` and the END-only fast path apply unchanged. FLDD and IIA (test) vs n, with a
least-squares line FLDD = slope·n + intercept (the paper finds FLDD linear in n for GPT-2 MLP8).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from omegaconf import DictConfig
from torch import Tensor, nn

from mlpim.engine.das import fit
from mlpim.engine.interventions import clean_metrics, evaluate
from mlpim.engine.models import ConfigError
from mlpim.engine.patching import full, subspace_patch
from mlpim.engine.subspace import RotatedSubspace
from mlpim.experiments.common import model_for, paper_splits, site_of
from mlpim.report import io

log = logging.getLogger(__name__)


class NeuronSubspace(nn.Module):
    """A d×k orthonormal basis that is zero outside `neurons` (a width-n rotation embedded in d)."""

    def __init__(self, d: int, neurons: Int[Tensor, n], k: int, generator=None):
        super().__init__()
        self.d = d
        self.register_buffer("neurons", neurons.long())
        self.inner = RotatedSubspace(len(neurons), k, generator=generator)

    @property
    def basis(self) -> Float[Tensor, "d k"]:
        inner = self.inner.basis
        return inner.new_zeros(self.d, inner.shape[1]).index_copy(0, self.neurons, inner)

    def forward(self, base: Float[Tensor, "b d"], source: Float[Tensor, "b d"]) -> Tensor:
        return subspace_patch(base, source, self.basis)


def neuron_order(d: int, subset: str, gen: torch.Generator) -> Int[Tensor, d]:
    """Neuron order whose first n entries are the n-subset: `first` (0..d-1) or `random`."""
    if subset == "first":
        return torch.arange(d)
    if subset == "random":
        return torch.randperm(d, generator=gen)
    raise ConfigError(f"unknown extra.subset {subset!r}; allowed: first, random")


def grid(values, d: int) -> list[int]:
    """`extra.n_grid` as sorted neuron counts ≤ d; `all` (or any value ≥ d) means d."""
    ns = {d if str(v) == "all" else min(int(v), d) for v in values}
    if min(ns) < 1:
        raise ConfigError(f"extra.n_grid={list(values)} holds a count below 1")
    return sorted(ns)


def budget_rows(cfg, model, splits, kind: str, layer: int, ns: list[int], order) -> list[dict]:
    """Train one restricted DAS per n; FLDD/IIA rows on train and test, and the final loss."""
    rows, d = [], splits["train"][0].base_act.shape[-1]
    for n in ns:
        start = time.time()
        torch.manual_seed(cfg.seed)  # the orthogonal parametrization draws from the global one
        gen = torch.Generator().manual_seed(cfg.seed)
        module = NeuronSubspace(d, order[:n], cfg.method.dim, gen).to(model.cfg.device)
        history = fit(model, splits["train"], None, module, cfg.method,
                      torch.Generator().manual_seed(cfg.seed), f"DAS {n} neurons")  # fmt: skip
        losses = history["train_loss"].tolist()
        keys = {"intervention": f"das_n{n}", "site": kind, "layer": layer, "n_neurons": n}
        for split, prepared in splits.items():
            values = evaluate(model, prepared, module)
            rows += io.metric_rows(values, split=split, **keys)
        rows += io.metric_rows({"final_loss": losses[-1]} if losses else {}, split="train", **keys)
        log.info("n=%d: %.1f s; test FLDD %.3f, IIA %.3f", n, time.time() - start,
                 values["fldd"], values["iia"])  # fmt: skip
    return rows


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least-squares line y = slope·x + intercept and its R²."""
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = ((y - y.mean()) ** 2).sum()
    return {
        "slope": slope,
        "intercept": intercept,
        "r2_fit": 1 - (resid**2).sum() / ss if ss else 1.0,
    }


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    model = model_for(cfg)
    kind, layer = site_of(cfg, model)
    if cfg.method.name != "das":
        raise ConfigError(f"ioi_neuron_budget trains DAS; got method {cfg.method.name!r}")
    start = time.time()
    splits = paper_splits(cfg, model, kind, layer)
    log.info("prepared %s L%d pairs in %.0f s", kind, layer, time.time() - start)
    d = splits["train"][0].base_act.shape[-1]
    ns = grid(cfg.extra.n_grid, d)
    if cfg.method.dim > ns[0]:
        raise ConfigError(f"method.dim={cfg.method.dim} exceeds the smallest n {ns[0]}")
    order = neuron_order(d, cfg.extra.subset, torch.Generator().manual_seed(cfg.seed))
    keys = {"site": kind, "layer": layer}
    rows = io.metric_rows(clean_metrics(splits["test"]), intervention="clean", split="test", **keys)
    rows += io.metric_rows(evaluate(model, splits["test"], full),
                           intervention="full", split="test", n_neurons=d, **keys)  # fmt: skip
    rows += budget_rows(cfg, model, splits, kind, layer, ns, order)
    df = io.tidy(rows, cfg)
    fit = fit_rows(df, kind, layer)
    df = pd.concat([df, io.tidy(fit, cfg)], ignore_index=True)
    budget_plot(df, run_dir, f"{cfg.model.name}, {kind} L{layer}, subset {cfg.extra.subset}")
    io.write_text(summary_markdown(cfg, df, kind, layer), run_dir, "summary.md")
    return df


def das_test(df: pd.DataFrame, metric: str) -> pd.Series:
    """Test `metric` of the restricted DAS runs indexed by n."""
    sel = df[df.intervention.str.startswith("das_n") & (df.split == "test") & (df.metric == metric)]
    return sel.set_index("n_neurons").value.sort_index()


def fit_rows(df: pd.DataFrame, kind: str, layer: int) -> list[dict]:
    """Rows of the linear fit of test FLDD vs n."""
    fldd = das_test(df, "fldd")
    if len(fldd) < 2:
        return []
    fit = linear_fit(fldd.index.to_numpy(float), fldd.to_numpy(float))
    return io.metric_rows(fit, intervention="fldd_vs_n_fit", site=kind, layer=layer, split="test")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Rows n; columns test FLDD, IIA, LD; the full patch as its own row."""
    sel = df[(df.split == "test") & df.metric.isin(["fldd", "iia", "logit_diff"])]
    sel = sel[sel.intervention.str.startswith("das_n") | (sel.intervention == "full")]
    sel = sel.astype({"n_neurons": int})
    return sel.pivot_table(index=["intervention", "n_neurons"], columns="metric", values="value",
                           sort=False).sort_index(level="n_neurons")  # fmt: skip


def summary_markdown(cfg: DictConfig, df: pd.DataFrame, kind: str, layer: int) -> str:
    table = summarize(df).reset_index(level="n_neurons")
    fit = df[df.intervention == "fldd_vs_n_fit"].set_index("metric").value
    line = (f"FLDD ≈ {fit.slope:.3g}·n + {fit.intercept:.3g} (R² of the fit {fit.r2_fit:.3f})"
            if len(fit) else "no fit (one n)")  # fmt: skip
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; site: {kind}, layer {layer}; k = "
        f"{cfg.method.dim}; subset: {cfg.extra.subset}; epochs {cfg.method.epochs}; seed "
        f"{cfg.seed}\n\n{io.markdown_table(table)}\n\n{line}\n\nPaper (GPT-2 MLP8): FLDD grows "
        "linearly with n.\n"
    )


def budget_plot(df: pd.DataFrame, run_dir: Path, title: str) -> None:
    """Test FLDD and IIA vs n with the fitted line and the full-patch FLDD."""
    fldd, iia = das_test(df, "fldd"), das_test(df, "iia")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(fldd.index, fldd, "o-", color="tab:red", label="FLDD (test)")
    ax.plot(iia.index, iia, "s-", color="tab:blue", label="IIA (test)")
    fit = df[df.intervention == "fldd_vs_n_fit"].set_index("metric").value
    if len(fit):
        xs = np.linspace(0, fldd.index.max(), 50)
        ax.plot(xs, fit.slope * xs + fit.intercept, "r:", label=f"linear fit (R² {fit.r2_fit:.2f})")
    full_fldd = df[(df.intervention == "full") & (df.metric == "fldd")].value
    if len(full_fldd):
        ax.axhline(full_fldd.iloc[0], color="gray", ls="--", label="full MLP patch FLDD")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="neurons n available to DAS", ylabel="fraction", title=title)
    ax.legend(fontsize=8)
    io.save_figure(fig, run_dir, "neuron_budget.png")
