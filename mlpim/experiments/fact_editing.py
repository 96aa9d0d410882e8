"""fact_editing: the rank-1 W_out edit built from each per-pair direction, against the patch.

For each test fact pair and layer, the per-pair DAS direction v (trained as in `fact_patching`,
same seeds: the same directions) gives the patch k -> k + ((k_src - k)·v) v at the key k and the
edit ΔW_out = b ⊗ (c · v @ W_out), b = C⁻¹k / (kᵀC⁻¹k), C the second moment of mlp_post over
offline text. The edit is applied to the model's weight, the base prompt run unpatched.
Reported per layer: the patch's and the edit's fact flip rate and FLDD, and specificity: on other
facts of the same relation, the share still answered right and the share now giving the edited
pair's source attribute.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from omegaconf import DictConfig

from mlpim.analysis import editing as ED
from mlpim.analysis import fact_das as FD
from mlpim.analysis import nullspace as ns
from mlpim.engine import metrics
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import prepare
from mlpim.experiments import Experiment
from mlpim.experiments.common import das_settings, model_for, predictor
from mlpim.options import FactEditingOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.tasks.facts import fact_task

log = logging.getLogger(__name__)


def edit_metrics(e: ED.Effects, clean: ED.Effects, patch_hit: torch.Tensor) -> dict[str, float]:
    """Edit's fact flip, FLDD, LD, agreement with the patch, and neighbour specificity."""
    return {
        "fact_flip": e.hit.mean().item(),
        "fldd": metrics.fldd(e.ld, clean.ld),
        "logit_diff": e.ld.mean().item(),
        "agree_with_patch": (e.hit == patch_hit.float().cpu()).float().mean().item(),
        "neighbour_acc": e.neighbour_acc.nanmean().item(),
        "neighbour_acc_change": (e.neighbour_acc - clean.neighbour_acc).nanmean().item(),
        "neighbour_to_source": e.neighbour_to_source.nanmean().item(),
    }


def pair_directions(cfg, opts: Options, model, task, test, layer: int) -> torch.Tensor:
    """The per-pair directions at `layer`: read from `extra.pair_run`, else trained as
    fact_patching trains them (same seeds: the same directions)."""
    if opts.pair_run:
        return FD.load_pair_directions(opts.pair_run, layer, task.pairs["test"], model)
    seed, method = cfg.seed + layer, das_settings(cfg)
    return FD.pair_directions(model, test, seed, opts.pair_steps, method)[0]


def layer_rows(
    cfg, opts: Options, model, task, probes, clean, cov, n_tok: int, layer: int
) -> list[dict]:
    """Patch and edit rows at one layer (test pairs)."""
    keys = {"site": FD.KIND, "layer": layer, "split": "test", "seed": cfg.seed}
    dev = model.cfg.device
    batches = [b.to(dev) for b in task.batches["test"]]
    test = prepare(model, batches, FD.KIND, layer, cfg.method.engine)
    v = pair_directions(cfg, opts, model, task, test, layer)
    patch = FD.outcomes(model, test, FD.PairDirections(v).select)
    clean_values = {
        "neighbour_acc": clean.neighbour_acc.nanmean().item(),
        "logit_diff": clean.ld.mean().item(),
    }
    rows = io.metric_rows(clean_values, intervention="clean", **keys)
    rows += io.metric_rows(FD.fact_metrics(patch), intervention="patch", **keys)
    cov, ridge = ED.regularised(cov.to(dev), opts.cov_ridge)
    k, k_src = (torch.cat([getattr(p, a) for p in test]) for a in ("base_act", "source_act"))
    b, w_out = ED.key_vectors(cov, k), ns.mlp_w_out(model, layer)
    delta = lambda i: ED.rank_one_delta(w_out, v[i], k[i], k_src[i], b[i])  # noqa: E731
    edit = ED.effects(model, probes, layer, delta)
    rows += io.metric_rows(edit_metrics(edit, clean, patch.hit), intervention="edit", **keys)
    key_res = ((k.double() * b).sum(1) - 1).abs().max().item()
    rows += io.metric_rows(
        {"ridge": ridge, "key_residual": key_res, "cov_tokens": n_tok},
        intervention="covariance",
        **keys,
    )
    return rows


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Edit W_out for each test pair at every layer of the grid; the tidy metrics."""
    ex = options(cfg, Options)
    FD.check_setup(cfg.experiment, cfg.dataset.name, cfg.site.kind, cfg.method.name, cfg.method.dim)
    FD.check_pair_run(ex.pair_run)
    model = model_for(cfg)
    torch.manual_seed(cfg.seed)
    predict = predictor(model) if ex.known_only else None
    task = fact_task(model.tokenizer, cfg.dataset, cfg.seed, predict, model.cfg.n_ctx)
    layers = FD.layer_grid(ex.layers, ex.layer_step, model.cfg.n_layers)
    tokens = ED.corpus_tokens(model.tokenizer, ex.corpus_path, ex.chunk_len, ex.n_cov_tokens)
    covs, n_tok = ED.second_moments(model, tokens, layers, ex.batch_size)
    log.info("second moments of mlp_post from %d tokens, layers %s", n_tok, layers)
    rng = random.Random(cfg.seed)
    probes = [
        ED.probe(model.tokenizer, p, task.facts, ex.n_neighbours, rng) for p in task.pairs["test"]
    ]
    clean = ED.effects(model, probes)
    rows = []
    for layer in layers:
        rows += layer_rows(cfg, ex, model, task, probes, clean, covs[layer], n_tok, layer)
        log.info("layer %d done", layer)
    df = io.tidy(rows, cfg)
    io.write_text(summary_markdown(cfg, ex, df, n_tok), run_dir, "summary.md")
    edit_plot(df, run_dir, f"{cfg.experiment}: {cfg.model.name}, rank-1 W_out edit vs patch")
    return df


PLOT = {
    ("patch", "fact_flip"): "patch: fact flip",
    ("edit", "fact_flip"): "edit: fact flip",
    ("edit", "neighbour_acc"): "edit: neighbours still right",
    ("edit", "neighbour_to_source"): "edit: neighbours -> source attribute",
}


def edit_plot(df: pd.DataFrame, run_dir: Path, title: str) -> None:
    """Patch and edit fact flip rates and the edit's specificity against layer."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (name, metric), label in PLOT.items():
        s = df[(df.intervention == name) & (df.metric == metric)].sort_values("layer")
        ax.plot(s.layer, s.value, marker="o", label=label, ls="-" if metric == "fact_flip" else ":")
    ax.set(title=title, xlabel="layer", ylabel="share of prompts", ylim=(-0.03, 1.03))
    ax.legend(fontsize=8)
    io.save_figure(fig, run_dir, "edit_vs_patch.png")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Rows layer; columns patch/edit metrics (test pairs)."""
    d = df[df.intervention.isin(["patch", "edit"])]
    wide = d.pivot_table(
        index="layer", columns=["intervention", "metric"], values="value", sort=False
    )
    wide.columns = [f"{i} {m}" for i, m in wide.columns]
    return wide


def summary_markdown(cfg: DictConfig, opts: Options, df: pd.DataFrame, n_tok: int) -> str:
    """summary.md: the patch and edit table per layer, where C needed a ridge."""
    ridge = df[(df.intervention == "covariance") & (df.metric == "ridge")]
    ridged = sorted(int(x) for x in ridge[ridge.value > 0].layer)
    note = (
        f"C was singular at layers {ridged}: ridge λ = {opts.cov_ridge} × mean "
        "eigenvalue added there"
        if ridged
        else "C was nonsingular at every layer (no ridge)"
    )
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; mlp_post at the last subject token; "
        f"seed {cfg.seed}; per-pair steps {opts.pair_steps}; C from {n_tok} tokens of "
        f"{opts.corpus_path or 'pydoc_data'}; {note}.\n\n"
        f"{io.markdown_table(summarize(df))}\n"
    )


EXPERIMENT = Experiment(
    run=run,
    options=Options,
    summarize=summarize,
    inputs={"extra.corpus_path": None, "extra.pair_run": "pair_directions_L*.pt"},
    positive=("batch_size", "pair_steps"),
)
