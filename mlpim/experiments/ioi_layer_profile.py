"""ioi_layer_profile: where the illusion lives. Per layer, DAS on mlp_post next to the full-MLP
patch and DAS on resid_post next to the full residual patch (test FLDD, IIA, flip rate), and the
share of v_MLP's squared norm in W_out's nullspace.

The task's pairs are built once; each batch's base and source prompts run once for all sites
(`analysis.profile.prepare_many`). Each site's DAS run, evaluation and rows are those of a
single-layer `ioi_mlp8_das` / `ioi_resid8_das` run with the same seed and epochs.

Layers: `extra.layers` (a list), else `extra.first_layer`..`extra.last_layer`, where an end left
null comes from `extra.locate_run` (an ioi_locate run: its signal range, see
`landmarks.signal_range`) or else from the model's landmarks, widened by `extra.window` layers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from omegaconf import DictConfig

from mlpim import constants as C
from mlpim.analysis import landmarks as lmk
from mlpim.analysis import nullspace as ns
from mlpim.analysis.profile import null_fraction, prepare_many
from mlpim.engine.das import train_das
from mlpim.engine.interventions import Prepared, clean_metrics, evaluate
from mlpim.engine.models import ConfigError, site_width
from mlpim.engine.patching import full, subspace
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.experiments.common import model_for, predictor
from mlpim.report import io
from mlpim.tasks import task_splits

log = logging.getLogger(__name__)
KINDS = ("mlp_post", "resid_post")
LABEL = {"mlp_post": ("v_MLP", "full MLP"), "resid_post": ("v_resid", "full resid")}
DIRECTIONS = "directions"


def read_locate(path: str | None) -> pd.DataFrame | None:
    """The metrics table of an ioi_locate run (its directory or its metrics.csv)."""
    if not path:
        return None
    p = Path(path)
    p = p / C.METRICS if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"extra.locate_run={path}: no ioi_locate {C.METRICS} there")
    return pd.read_csv(p)


def default_range(cfg: DictConfig, locate: pd.DataFrame | None) -> tuple[int, int, str]:
    """(first, last, why) before widening: the locate run's signal range, else the landmarks."""
    thr = cfg.extra.signal_threshold
    if locate is not None:
        found = lmk.signal_range(locate, thr)
        if found is None:
            raise ConfigError(f"extra.locate_run: no layer's patch has FLDD >= {thr}")
        return *found, f"signal range of {cfg.extra.locate_run} (FLDD >= {thr})"
    marks = cfg.model.landmarks
    known = [x for x in (marks.handover_layer, marks.mlp_in_the_middle) if x is not None]
    if not known:
        raise ConfigError(
            f"model {cfg.model.name!r} has no landmarks: give extra.layers=[...], "
            "extra.first_layer/extra.last_layer, or extra.locate_run=<ioi_locate run>"
        )
    return min(known), max(known), f"landmarks of {cfg.model.name}"


def profile_layers(
    cfg: DictConfig, n_layers: int, locate: pd.DataFrame | None
) -> tuple[list[int], str]:
    """The layers to profile and how they were chosen."""
    extra = cfg.extra
    if extra.layers is not None:
        layers, why = sorted({int(x) for x in extra.layers}), "extra.layers"
    else:
        first, last = extra.first_layer, extra.last_layer
        why = "extra.first_layer/last_layer"
        if first is None or last is None:
            lo, hi, why = default_range(cfg, locate)
            w = extra.window
            first = max(lo - w, 0) if first is None else first
            last = min(hi + w, n_layers - 1) if last is None else last
            why += f" ± {w}"
        layers = list(range(int(first), int(last) + 1))
    if not layers or not 0 <= layers[0] <= layers[-1] < n_layers:
        raise ConfigError(f"profile layers {layers} must be non-empty, within 0..{n_layers - 1}")
    return layers, why


def site_rows(
    cfg: DictConfig, model, kind: str, layer: int, splits: dict[str, list[Prepared]],
    run_dir: Path,
) -> tuple[list[dict], pd.DataFrame]:  # fmt: skip
    """DAS at one site, then the rows of a single-layer subspace run (+ v_MLP's nullspace share)."""
    start = time.time()
    rot, hist = train_das(model, splits["train"], splits["test"], cfg.method, cfg.seed)
    basis = rot.basis.detach()
    keys = {"site": kind, "layer": layer, "dim": cfg.method.dim, "seed": cfg.seed}
    rows, found = [], {}
    for split, prepared in splits.items():
        rows += io.metric_rows(clean_metrics(prepared), intervention="clean", split=split, **keys)
        for name, setter in (
            ("full", full),
            ("das", subspace(basis.to(prepared[0].base_act.device))),
        ):
            found[split, name] = evaluate(model, prepared, setter)
            rows += io.metric_rows(found[split, name], intervention=name, split=split, **keys)
    test = found["test", "das"]
    if kind == "mlp_post":
        frac, chance = null_fraction(basis, ns.mlp_w_out(model, layer))
        values = {"null_frac": frac, "null_frac_random": chance}
        rows += io.metric_rows(values, intervention="das", split="train", **keys)
    (run_dir / DIRECTIONS).mkdir(parents=True, exist_ok=True)
    save_subspace(
        run_dir / DIRECTIONS / f"{kind}_L{layer}.pt", basis,
        **direction_meta(model, cfg.model, kind, layer), k=basis.shape[1], seed=cfg.seed,
        method="das", metrics=test,
    )  # fmt: skip
    log.info("%s L%d: %.0f s, test FLDD %.3f, IIA %.3f", kind, layer, time.time() - start,
             test["fldd"], test["iia"])  # fmt: skip
    return rows, hist.assign(site=kind, layer=layer)


def check_method(cfg: DictConfig, model) -> None:
    """DAS only, with a dimension both sites can hold."""
    if cfg.method.name != "das":
        raise ConfigError(f"ioi_layer_profile trains DAS (method=das), got {cfg.method.name!r}")
    width = min(site_width(model, k) for k in KINDS)
    if not 1 <= cfg.method.dim <= width:
        raise ConfigError(f"method.dim={cfg.method.dim}: allowed 1..{width} (both sites)")


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    locate = read_locate(cfg.extra.locate_run)
    model = model_for(cfg)
    check_method(cfg, model)
    layers, why = profile_layers(cfg, model.cfg.n_layers, locate)
    log.info("profiling layers %s (%s)", layers, why)
    batches = task_splits(model.tokenizer, cfg.dataset, cfg.seed, predictor(model), model.cfg.n_ctx)
    dev = model.cfg.device
    sites = [(kind, layer) for layer in layers for kind in KINDS]
    start = time.time()
    prepared = {s: prepare_many(model, [b.to(dev) for b in bs], sites, cfg.method.engine)
                for s, bs in batches.items()}  # fmt: skip
    log.info("prepared %d sites in %.0f s", len(sites), time.time() - start)
    rows, hists = [], []
    for kind, layer in sites:
        splits = {s: prepared[s][(kind, layer)] for s in prepared}
        site_r, hist = site_rows(cfg, model, kind, layer, splits, run_dir)
        rows, hists = rows + site_r, [*hists, hist]
        for s in prepared:  # free this site's states
            prepared[s][(kind, layer)] = []
    io.atomic_write(run_dir / C.HISTORY, lambda p: pd.concat(hists).to_csv(p, index=False))
    df = io.tidy(rows, cfg)
    table = summarize(df)
    io.write_text(summary_markdown(cfg, table, why), run_dir, C.SUMMARY)
    profile_plot(df, run_dir, f"{cfg.model.name}: layer profile (k = {cfg.method.dim})", cfg)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per layer: test FLDD / IIA / flip rate of each intervention, v_MLP's null share."""
    test = df[(df.split == "test") & (df.intervention != "clean")]
    cols = {}
    for kind, (das, whole) in LABEL.items():
        at = test[test.site == kind]
        for name, label in (("das", das), ("full", whole)):
            wide = at[at.intervention == name].pivot_table(
                index="layer", columns="metric", values="value"
            )
            metrics = ("fldd", "iia", "flip_rate") if name == "das" else ("fldd",)
            cols |= {f"{label} {m.replace('_rate', '')}": wide[m] for m in metrics}
    null = df[df.metric == "null_frac"].set_index("layer").value
    table = pd.DataFrame(cols).assign(**{"v_MLP null frac": null})
    order = sorted(table.columns, key=lambda c: not c.endswith("fldd"))  # FLDD first (stable)
    return table[order].rename_axis("layer")


def summary_markdown(cfg: DictConfig, table: pd.DataFrame, why: str) -> str:
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; layers from {why}; k = "
        f"{cfg.method.dim}; {cfg.method.epochs} DAS epochs; seed {cfg.seed}; test pairs\n\n"
        f"{io.markdown_table(table)}\n"
    )


def profile_plot(df: pd.DataFrame, run_dir: Path, title: str, cfg: DictConfig) -> None:
    """Two panels over layers: FLDD of the four patches; IIA, flip rate and v_MLP's null share."""
    table = summarize(df)
    x = table.index
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    styles = {"v_MLP": "tab:red", "full MLP": "tab:orange", "v_resid": "tab:blue",
              "full resid": "tab:cyan"}  # fmt: skip
    for label, color in styles.items():
        ls = "-" if label.startswith("v_") else "--"
        a.plot(x, table[f"{label} fldd"], marker="o", color=color, ls=ls, label=label)
    a.axhline(0, color="k", lw=0.8)
    a.axhline(1, color="gray", lw=0.8, ls=":")
    a.set(title=title, xlabel="layer", ylabel="test FLDD (> 1: prediction flipped)")
    for label in ("v_MLP", "v_resid"):
        color = styles[label]
        b.plot(x, table[f"{label} iia"], marker="o", color=color, label=f"{label} IIA")
        b.plot(x, table[f"{label} flip"], marker="s", color=color, ls="--",
               label=f"{label} flip rate")  # fmt: skip
    b.plot(x, table["v_MLP null frac"], marker="^", color="k", label="v_MLP nullspace share")
    chance = df[df.metric == "null_frac_random"].value
    if len(chance):
        b.axhline(chance.iloc[0], color="gray", lw=0.8, ls=":", label="random direction")
    b.set(xlabel="layer", ylabel="fraction", ylim=(-0.02, 1.02), title="IIA, flip rate, nullspace")
    mid = cfg.model.landmarks.mlp_in_the_middle
    for ax in (a, b):
        if mid is not None and x.min() <= mid <= x.max():
            ax.axvline(mid, color="gray", lw=0.8, ls="-.", label="mlp_in_the_middle (config)")
        ax.set_xticks(list(x))
        ax.legend(fontsize=7)
    io.save_figure(fig, run_dir, "layer_profile.png")
