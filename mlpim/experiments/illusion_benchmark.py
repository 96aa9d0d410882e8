"""illusion_benchmark: how often is illusion_check's verdict right on cases whose truth is planted?

At the MLPs `extra.bench_layer_offsets` around the landmark, `mlpim.analysis.benchmark` plants
illusions by the paper's definition and real MLP directions (rank-1 W_out edits), adds v_resid
and the mean differences, and checks each one with the thresholds `check.*` as set: the rates are
measured, never tuned toward the planted answers. The toy model's cases are reported apart.

Writes metrics.csv, cases.csv (one row per case: verdict, score, checks fired, properties),
summary.md (the confusion matrix with borderline in its own column, the rates and AUC, each miss
with its reason), confusion.png, roc.png, v_resid_post_L<n>.pt.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mlpim import constants as C
from mlpim.analysis import benchmark as B
from mlpim.analysis.checks import Thresholds
from mlpim.engine.direction import Direction
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.experiments import Experiment
from mlpim.experiments.common import (
    das_settings,
    model_for,
    model_spec,
    natural_site_acts,
    reference_store,
    require_ioi,
)
from mlpim.options import IllusionBenchmarkOptions, options
from mlpim.report import illusion as report
from mlpim.report import io
from mlpim.tasks import task_splits
from mlpim.tasks.ioi import held_out_pairs

CASES = "cases.csv"
PLOTS = (report.CONFUSION_PLOT, report.ROC_PLOT)


def bench_options(cfg: DictConfig, opts: IllusionBenchmarkOptions) -> B.BenchOptions:
    """What the benchmark plants and measures."""
    return B.BenchOptions(
        angles=tuple(float(a) for a in opts.bench_angles),
        edits=tuple(opts.bench_edits),
        edit_strengths=tuple(float(s) for s in opts.edit_strengths),
        n_random_directions=opts.n_random_directions,
        n_natural=opts.n_natural,
        random_mlp_seeds=opts.random_mlp_seeds,
        natural_ridge=opts.natural_ridge,
        seed=int(cfg.seed),
    )


def bench_layers(cfg: DictConfig, model, offsets: list[int]) -> list[int]:
    """The landmark MLP plus `offsets` (`extra.bench_layer_offsets`), inside the model."""
    mid = int(cfg.model.landmarks.mlp_in_the_middle)
    return [mid + o for o in offsets if 0 <= mid + o < model.cfg.n_layers]


def pair_batches(cfg: DictConfig, model) -> dict[str, list]:
    """The train and test pairs and the two held-out sets, on the model's device."""
    batches = task_splits(model.tokenizer, cfg.dataset, cfg.seed)
    batches |= held_out_pairs(model.tokenizer, cfg.dataset, cfg.seed)
    return {k: [b.to(model.cfg.device) for b in bs] for k, bs in batches.items()}


def save_layer(cfg, model, layer: int, res: B.LayerResult, run_dir: Path) -> None:
    """v_resid and the random-MLP histories of one layer."""
    meta = direction_meta(model, model_spec(cfg), "resid_post", layer)
    save_subspace(
        run_dir / f"v_resid_post_L{layer}.pt",
        res.v_resid[:, None],
        **meta,
        k=1,
        seed=cfg.seed,
        method="das",
    )
    for seed, hist in res.histories.items():
        io.write_csv(hist, run_dir, f"history_random_mlp_L{layer}_seed{seed}.csv")


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Every planted case at each benchmark layer, plus the toy cases; the metrics."""
    require_ioi(cfg)
    model = model_for(cfg)
    extra = options(cfg, IllusionBenchmarkOptions)
    th, opts = Thresholds.from_mapping(cfg.check), bench_options(cfg, extra)
    layers = bench_layers(cfg, model, extra.bench_layer_offsets)
    method = das_settings(cfg, dim=1)
    epochs = int(extra.random_mlp_epochs or method.epochs)
    random_method = das_settings(cfg, reference=True, dim=1, epochs=epochs)
    batches, store = pair_batches(cfg, model), reference_store(extra.reference_cache)
    natural = natural_site_acts(cfg, model, "mlp_post", layers, extra.n_natural_prompts)
    engine = cfg.method.engine
    rows, cases = [], []
    for layer in tqdm(layers, desc="illusion_benchmark: layers"):
        res = B.layer_result(
            model, batches, layer, th, opts, natural[layer], method, random_method, engine, store
        )
        save_layer(cfg, model, layer, res, run_dir)
        rows, cases = rows + res.rows, cases + res.cases
    if extra.bench_toy:
        cases += B.toy_rows(th)
    table = pd.DataFrame(cases)
    io.write_csv(table, run_dir, CASES)
    write_report(cfg, table, run_dir)
    for c in cases:
        rows += io.metric_rows(
            {"score": c["score"], "miss": float(c["miss"])},
            intervention=c["case"],
            site=c["site"],
            layer=c["layer"],
            split="test",
            case=c["case"],
        )
    return io.tidy(rows, cfg)


def write_report(cfg: DictConfig, table: pd.DataFrame, run_dir: Path) -> None:
    """summary.md, the confusion matrix and the ROC curve."""
    conf, rates = B.confusion(table), B.rates(table)
    header = (
        f"model: {cfg.model.name}; layers {sorted(set(table.layer) - {-1})} (toy: -1); "
        f"seed {cfg.seed}; thresholds check.* as set"
    )
    misses = table[table.miss][["case", "layer", "site", "fldd", "label", "reason"]]
    io.write_text(report.benchmark_markdown(header, conf, rates, misses, table), run_dir, C.SUMMARY)
    report.confusion_plot(conf, run_dir, f"{cfg.model.name}: planted truth × verdict")
    fpr, tpr = B.roc_curve(table)
    report.roc_plot(fpr, tpr, rates["auc"], run_dir, f"{cfg.model.name}: illusion score")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Score and miss per case (from the metrics table)."""
    sub = df[df.metric.isin(["score", "miss"])]
    return sub.pivot_table(index=["site", "layer", "case"], columns="metric", values="value")


EXPERIMENT = Experiment(
    run=run, options=IllusionBenchmarkOptions, summarize=summarize, positive=("random_mlp_epochs",)
)
