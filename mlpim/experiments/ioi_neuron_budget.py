"""ioi_neuron_budget: DAS in the middle MLP restricted to n of its neurons, for n on a log grid.

The basis is zero outside the chosen neurons: an orthonormal n×k `RotatedSubspace` embedded into
d_mlp, so `evaluate` and the END-only fast path apply unchanged. FLDD and IIA (test) vs n, with a
least-squares line FLDD = slope·n + intercept (the paper finds FLDD linear in n for GPT-2 MLP8).
The measurement is `mlpim.analysis.budget`; the table and figure are
`mlpim.report.neuron_budget`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from mlpim.analysis.budget import budget_rows, fit_rows, grid, neuron_order
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import clean_metrics, evaluate
from mlpim.engine.patching import full
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import das_settings, model_for, paper_splits, site_of
from mlpim.options import IoiNeuronBudgetOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.report.neuron_budget import budget_plot, summarize, summary_markdown

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Restricted DAS for every n of the grid, the full patch and the fit; the tidy metrics."""
    opts = options(cfg, Options)
    model = model_for(cfg)
    kind, layer = site_of(cfg, model)
    if cfg.method.name != "das":
        raise ConfigError(f"ioi_neuron_budget trains DAS; got method {cfg.method.name!r}")
    start = time.time()
    splits = paper_splits(cfg, model, kind, layer)
    log.info("prepared %s L%d pairs in %.0f s", kind, layer, time.time() - start)
    d = splits["train"][0].base_act.shape[-1]
    ns = grid(opts.n_grid, d)
    if cfg.method.dim > ns[0]:
        raise ConfigError(f"method.dim={cfg.method.dim} exceeds the smallest n {ns[0]}")
    order = neuron_order(d, opts.subset, torch.Generator().manual_seed(cfg.seed))
    keys = {"site": kind, "layer": layer}
    test = splits["test"]
    rows = io.metric_rows(clean_metrics(test), intervention="clean", split="test", **keys)
    patch = evaluate(model, test, full)
    rows += io.metric_rows(patch, intervention="full", split="test", n_neurons=d, **keys)
    rows += budget_rows(model, splits, kind, layer, ns, order, das_settings(cfg), cfg.seed)
    df = io.tidy(rows, cfg)
    df = pd.concat([df, io.tidy(fit_rows(df, kind, layer), cfg)], ignore_index=True)
    budget_plot(df, run_dir, f"{cfg.model.name}, {kind} L{layer}, subset {opts.subset}")
    io.write_text(summary_markdown(cfg, opts.subset, df, kind, layer), run_dir, "summary.md")
    return df


EXPERIMENT = Experiment(run=run, options=Options, summarize=summarize)
