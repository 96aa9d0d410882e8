"""illusion_benchmark: how often is illusion_check's verdict right on cases whose truth is planted?

On any task (`dataset=`), at the MLPs `extra.layers` (default: `extra.bench_layer_offsets` around
the IOI landmark),
`mlpim.analysis.bench_cases` plants illusions (dormant pathways opened by a rank-1 edit, and
today's mixing construction), real MLP directions (rank-1 edits), hard negatives and Wu et al.'s
controls, and checks each one with the thresholds `check.*` as set: the rates are measured, never
tuned toward the planted answers. Every summary carries the hash of the rule and the construction
(`bench_table.rule_hash`) and says whether its model × task is the calibration split.

Writes metrics.csv, cases.csv (one row per case: truth, kind, gate position, verdict, score,
checks that warned, the construction's properties), summary.md (rates with exact intervals, the
confusion matrix, misses with their reasons, refused edits), confusion.png, roc.png,
v_resid_post_L<n>.pt.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mlpim import constants as C
from mlpim.analysis import bench_table as T
from mlpim.analysis import benchmark as B
from mlpim.analysis import measure as M
from mlpim.analysis.bench_cases import layer_result
from mlpim.analysis.checks import Thresholds
from mlpim.engine.direction import Direction
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.experiments import Experiment
from mlpim.experiments.common import (
    das_settings,
    model_for,
    model_spec,
    natural_site_acts,
    predictor,
    reference_store,
)
from mlpim.options import IllusionBenchmarkOptions, options
from mlpim.report import bench as report
from mlpim.report import io
from mlpim.tasks import task_splits
from mlpim.tasks.ioi import held_out_pairs

CASES = "cases.csv"
PLOTS = (report.CONFUSION_PLOT, report.ROC_PLOT)


def bench_options(cfg: DictConfig, opts: IllusionBenchmarkOptions) -> B.BenchOptions:
    """What the benchmark plants and measures."""
    floats = lambda xs: tuple(float(x) for x in xs)  # noqa: E731
    return B.BenchOptions(
        mixing_angles=floats(opts.bench_angles),
        pathway_strengths=floats(opts.pathway_strengths),
        pathway_angles=floats(opts.pathway_angles),
        edits=tuple(int(e) for e in opts.bench_edits),
        edit_strengths=floats(opts.edit_strengths),
        null_norms=floats(opts.null_norms),
        n_random_directions=opts.n_random_directions,
        n_natural=opts.n_natural,
        random_mlp_seeds=opts.random_mlp_seeds,
        natural_ridge=opts.natural_ridge,
        seed=int(cfg.seed),
        min_clean_ratio=float(opts.min_clean_ratio),
        bench_k=tuple(int(k) for k in opts.bench_k),
    )


def bench_layers(cfg: DictConfig, model, opts: IllusionBenchmarkOptions) -> list[int]:
    """`extra.layers` where given (preflight checked them), else the landmark MLP plus
    `extra.bench_layer_offsets` inside the model: the landmark is IOI's, so another task names
    the layers where its variable lives."""
    if opts.layers is not None:
        return sorted({int(layer) for layer in opts.layers})
    mid = int(cfg.model.landmarks.mlp_in_the_middle)
    return [mid + o for o in opts.bench_layer_offsets if 0 <= mid + o < model.cfg.n_layers]


def pair_batches(cfg: DictConfig, model) -> dict[str, list]:
    """The task's train and test pairs (IOI: and its two held-out sets), on the model's device."""
    batches = task_splits(model.tokenizer, cfg.dataset, cfg.seed, predictor(model), model.cfg.n_ctx)
    if cfg.dataset.name == "ioi":
        batches |= held_out_pairs(model.tokenizer, cfg.dataset, cfg.seed)
    return {k: [b.to(model.cfg.device) for b in bs] for k, bs in batches.items()}


def natural_hidden(cfg: DictConfig, model, batches, layers: list[int], n: int, split: str):
    """{layer: END hidden activations of `n` IOI prompts of `split`'s templates and names}; on
    another task, of the split's base and source prompts at their patched position."""
    if cfg.dataset.name == "ioi":
        return natural_site_acts(cfg, model, "mlp_post", layers, n, split=split)
    prompts = [pb.base for pb in batches[split]] + [pb.source for pb in batches[split]]
    return M.natural_acts(model, prompts, "mlp_post", layers)


def save_layer(cfg, model, layer: int, res: B.LayerResult, run_dir: Path) -> None:
    """v_resid and the random-MLP histories of one layer."""
    meta = direction_meta(model, model_spec(cfg), "resid_post", layer)
    path = run_dir / f"v_resid_post_L{layer}.pt"
    save_subspace(path, res.v_resid[:, None].float(), **meta, k=1, seed=cfg.seed, method="das")
    for seed, hist in res.histories.items():
        io.write_csv(hist, run_dir, f"history_random_mlp_L{layer}_seed{seed}.csv")


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Every planted case at each benchmark layer, plus the toy cases; the metrics."""
    model = model_for(cfg)
    extra = options(cfg, IllusionBenchmarkOptions)
    th, opts = Thresholds.from_mapping(cfg.check), bench_options(cfg, extra)
    layers = bench_layers(cfg, model, extra)
    method = das_settings(cfg, dim=1)
    epochs = int(extra.random_mlp_epochs or method.epochs)
    random_method = das_settings(cfg, reference=True, dim=1, epochs=epochs)
    batches, store = pair_batches(cfg, model), reference_store(extra.reference_cache)
    n = extra.n_natural_prompts
    train = natural_hidden(cfg, model, batches, layers, n, "train")
    held = natural_hidden(cfg, model, batches, layers, n, "test")
    rows, cases = [], []
    for layer in tqdm(layers, desc="illusion_benchmark: layers"):
        site_of = lambda mlp, L=layer: B.mlp_site(  # noqa: E731
            model, mlp, L, th, opts, held[L], random_method, store
        )
        res = layer_result(
            model,
            batches,
            layer,
            site_of,
            (train[layer], held[layer]),
            method,
            cfg.method.engine,
            opts,
        )
        save_layer(cfg, model, layer, res, run_dir)
        rows, cases = rows + res.rows, cases + res.cases
    if extra.bench_toy:
        cases += B.toy_rows(th)
    table = labelled(pd.DataFrame(cases), cfg)
    io.write_csv(table, run_dir, CASES)
    write_report(cfg, table, run_dir)
    return io.tidy(rows + case_metrics(table), cfg)


def labelled(table: pd.DataFrame, cfg: DictConfig) -> pd.DataFrame:
    """The case table with its model, task, seed, split and the frozen rule's hash on every row."""
    model, task = str(cfg.model.name), task_name(cfg)
    split, rule = T.split_of(model, task), T.rule_hash()
    return table.assign(model=model, task=task, seed=int(cfg.seed), split=split, rule=rule)


def task_name(cfg: DictConfig) -> str:
    """The task's name: ioi, facts, or a pairs/MIB file's stem."""
    name = str(cfg.dataset.name)
    return Path(str(cfg.dataset.path)).stem if name in ("pairs", "mib") else name


def case_metrics(table: pd.DataFrame) -> list[dict]:
    """Score and miss of each scored case as metric rows."""
    rows = []
    for c in table[~table.refused].itertuples():
        rows += io.metric_rows(
            {"score": c.score, "miss": float(c.miss)},
            intervention=c.case,
            site=c.site,
            layer=c.layer,
            split="test",
            case=c.case,
        )
    return rows


def write_report(cfg: DictConfig, table: pd.DataFrame, run_dir: Path) -> None:
    """summary.md, the confusion matrix and the ROC curve."""
    title = f"{cfg.model.name} × {task_name(cfg)}"
    header = (
        f"model: {cfg.model.name}; task: {task_name(cfg)} "
        f"({T.split_of(str(cfg.model.name), task_name(cfg))} split); layers "
        f"{sorted(set(table.layer) - {-1})} (toy: -1); seed {cfg.seed}; rule hash "
        f"{T.rule_hash()}; thresholds check.* as set"
    )
    io.write_text(report.markdown(header, table), run_dir, C.SUMMARY)
    report.plots(table, run_dir, title)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Score and miss per case (from the metrics table)."""
    sub = df[df.metric.isin(["score", "miss"])]
    return sub.pivot_table(index=["site", "layer", "case"], columns="metric", values="value")


EXPERIMENT = Experiment(
    run=run, options=IllusionBenchmarkOptions, summarize=summarize, positive=("random_mlp_epochs",)
)
