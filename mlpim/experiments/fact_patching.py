"""fact_patching: the paper's factual-recall patches at the MLP hidden activations (mlp_post) of
the last subject token, over a grid of layers.

Interventions, all measured on the test fact pairs: `full` (the whole MLP hidden activation),
`pair_das` (a 1-D DAS direction trained on each pair itself, the paper's protocol, all pairs in
one batched run), `pair_row` / `pair_null` (the W_out row-space / nullspace part of each of those
directions, normalised; parts shorter than 0.01 skipped), `shared_das` (ONE direction trained on
the train pairs, measured on held-out test facts: Wu et al. 2024's stricter protocol) and its
`shared_row` / `shared_null` parts. Metrics: `fact_flip` (patched argmax = source attribute),
`fldd` (fraction of the base-minus-source logit difference removed), `logit_diff`, `ld_flip`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from omegaconf import DictConfig

from mlpim.analysis import fact_das as FD
from mlpim.analysis import nullspace as ns
from mlpim.engine.das import train_das
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import Prepared, prepare
from mlpim.engine.patching import full, subspace
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.experiments import Experiment
from mlpim.experiments.common import das_settings, model_for, model_spec, predictor
from mlpim.options import FactPatchingOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.tasks.facts import FactTask, fact_task

log = logging.getLogger(__name__)
KIND = FD.KIND
LINES = ("full", "pair_das", "pair_row", "pair_null", "shared_das", "shared_row", "shared_null")


def split_rows(o: FD.Outcomes, keep, name: str, keys: dict) -> list[dict]:
    """Tidy rows of one intervention's per-pair outcomes (over `keep`) on the test pairs."""
    return io.metric_rows(FD.fact_metrics(o, keep), intervention=name, split="test", **keys)


def pair_rows(model, test: list[Prepared], v: torch.Tensor, w_out, keys: dict) -> list[dict]:
    """pair_das and its row/null parts, each direction patched on its own pair; norm_sq rows."""
    rows = split_rows(FD.outcomes(model, test, FD.PairDirections(v).select), None, "pair_das", keys)
    for part, (unit, norm) in FD.direction_parts(v, w_out).items():
        keep = (norm >= FD.MIN_PART_NORM).cpu()
        o = FD.outcomes(model, test, FD.PairDirections(unit).select)
        rows += split_rows(o, keep, f"pair_{part}", keys)
        rows += io.metric_rows(
            {"norm_sq": (norm**2).mean().item()}, intervention=f"pair_{part}", split="test", **keys
        )
    return rows


def shared_rows(cfg, model, splits, w_out, keys: dict) -> tuple[list[dict], torch.Tensor, list]:
    """One direction trained on the train pairs; measured on test (and train) with its parts."""
    rot, hist = train_das(model, splits["train"], None, das_settings(cfg), cfg.seed + keys["layer"])
    v = rot.basis.detach()[:, 0]
    rows = []
    for split in ("test", "train"):
        o = FD.outcomes(model, splits[split], lambda a, b: subspace(v[:, None]))
        rows += io.metric_rows(FD.fact_metrics(o), intervention="shared_das", split=split, **keys)
    for part, (unit, norm) in FD.direction_parts(v[None], w_out).items():
        if norm[0] >= FD.MIN_PART_NORM:
            o = FD.outcomes(model, splits["test"], lambda a, b, u=unit[0]: subspace(u[:, None]))
            rows += split_rows(o, None, f"shared_{part}", keys)
        rows += io.metric_rows(
            {"norm_sq": norm[0].item() ** 2}, intervention=f"shared_{part}", split="test", **keys
        )
    return rows, v, hist.train_loss.tolist()


def history_rows(layer: int, protocol: str, losses: list[float]) -> list[dict]:
    """One history row per step (pair) or epoch (shared) of one layer's training."""
    return [
        {"layer": layer, "protocol": protocol, "step": i, "loss": x} for i, x in enumerate(losses)
    ]


def layer_rows(
    cfg, opts: Options, model, task: FactTask, layer: int, run_dir: Path
) -> tuple[list, list]:
    """Every intervention at one layer: tidy rows and history rows (loss per step/epoch)."""
    dev, keys = model.cfg.device, {"site": KIND, "layer": layer, "seed": cfg.seed}
    splits = {
        s: prepare(model, [b.to(dev) for b in bs], KIND, layer, cfg.method.engine)
        for s, bs in task.batches.items()
    }
    w_out = ns.mlp_w_out(model, layer)
    rows = split_rows(FD.outcomes(model, splits["test"], lambda a, b: full), None, "full", keys)
    seed = cfg.seed + layer
    v, pair_loss = FD.pair_directions(
        model, splits["test"], seed, opts.pair_steps, das_settings(cfg)
    )
    rows += pair_rows(model, splits["test"], v, w_out, keys)
    shared, shared_v, shared_loss = shared_rows(cfg, model, splits, w_out, keys)
    rows += shared
    meta = direction_meta(model, model_spec(cfg), KIND, layer, position="last_subject")
    save_subspace(
        run_dir / f"shared_L{layer}.pt",
        shared_v[:, None].cpu(),
        **meta,
        k=1,
        seed=cfg.seed,
        method="das",
        protocol="shared",
    )
    record = FD.pair_record(layer, v, task.pairs["test"], model)
    io.save_torch(record, FD.pair_file(run_dir, layer))
    hist = history_rows(layer, "pair", pair_loss) + history_rows(layer, "shared", shared_loss)
    return rows, hist


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Patch the fact pairs at every layer of the grid; the tidy metrics."""
    opts = options(cfg, Options)
    FD.check_setup(cfg.experiment, cfg.dataset.name, cfg.site.kind, cfg.method.name, cfg.method.dim)
    model = model_for(cfg)
    torch.manual_seed(cfg.seed)
    predict = predictor(model) if opts.known_only else None
    task = fact_task(model.tokenizer, cfg.dataset, cfg.seed, predict, model.cfg.n_ctx)
    layers = FD.layer_grid(opts.layers, opts.layer_step, model.cfg.n_layers)
    log.info(
        "%d known facts; %d train / %d test pairs; layers %s",
        len(task.facts),
        len(task.pairs["train"]),
        len(task.pairs["test"]),
        layers,
    )
    rows, hist = [], []
    for layer in layers:
        r, h = layer_rows(cfg, opts, model, task, layer, run_dir)
        rows, hist = rows + r, hist + h
        log.info("layer %d done", layer)
    df = io.tidy(rows, cfg)
    io.atomic_write(run_dir / "history.csv", lambda p: pd.DataFrame(hist).to_csv(p, index=False))
    io.write_text(summary_markdown(cfg, opts, df, len(task.facts)), run_dir, "summary.md")
    flip_plot(
        df, run_dir, f"{cfg.experiment}: {cfg.model.name}, mlp_post at the last subject token"
    )
    return df


def flip_plot(df: pd.DataFrame, run_dir: Path, title: str, lines=LINES) -> None:
    """Fact flip rate (test pairs) against layer, one line per intervention."""
    d = df[(df.split == "test") & (df.metric == "fact_flip")]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name in [n for n in lines if n in set(d.intervention)]:
        s = d[d.intervention == name].sort_values("layer")
        ax.plot(s.layer, s.value, marker="o", label=name, ls="--" if "shared" in name else "-")
    ax.set(
        title=title,
        xlabel="layer",
        ylabel="fact flip rate (argmax = source attribute)",
        ylim=(-0.03, 1.03),
    )
    ax.legend(fontsize=8)
    io.save_figure(fig, run_dir, "flip_rate.png")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Rows intervention; columns `fact_flip Lk` and `fldd Lk` on the test pairs."""
    d = df[(df.split == "test") & df.metric.isin(["fact_flip", "fldd"])]
    wide = d.pivot_table(
        index="intervention", columns=["metric", "layer"], values="value", sort=False
    )
    wide.columns = [f"{m} L{layer}" for m, layer in wide.columns]
    return wide.reindex([n for n in LINES if n in wide.index])


def summary_markdown(cfg: DictConfig, opts: Options, df: pd.DataFrame, n_facts: int) -> str:
    """summary.md: the flip and FLDD table and the per-pair minus shared gap by layer."""
    t = df[(df.split == "test") & (df.metric == "fact_flip")]
    by = t.pivot_table(index="layer", columns="intervention", values="value")
    gap = (by["pair_das"] - by["shared_das"]).round(3).to_dict()
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; mlp_post at the last subject token; "
        f"{n_facts} facts kept; seed {cfg.seed}; per-pair steps {opts.pair_steps}, shared "
        f"epochs {cfg.method.epochs}\n\nTest pairs. pair_*: each direction trained and measured "
        f"on its own pair (the paper's protocol); shared_*: one direction trained on the train "
        f"pairs (Wu et al. 2024).\n\n{io.markdown_table(summarize(df))}\n\n"
        f"Fact flip gap, per-pair minus shared, by layer: {gap}\n"
    )


EXPERIMENT = Experiment(run=run, options=Options, summarize=summarize, positive=("pair_steps",))
