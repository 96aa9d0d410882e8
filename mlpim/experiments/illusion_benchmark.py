"""illusion_benchmark: how often is illusion_check's verdict right on cases whose truth is planted?

At the MLPs `extra.bench_layer_offsets` around the landmark MLP (default ±2), a 1-D DAS direction
v_resid is trained at resid_post of the same layer (`method.*`; saved as `v_resid_post_L<n>.pt`,
its sign set along the ABB−BAB mean difference). Illusory directions follow the paper's recipe
(`mlpim.analysis.planted`): the nullspace part of the ABB−BAB mean hidden difference mixed, at
`extra.bench_angles` degrees, with a row-space direction that W_out maps onto v_resid (exactly
when `extra.dormant_dims` is null). Real ones: the hidden mean difference, its row-space part,
and at resid_post v_resid itself and the residual mean difference; plus the toy model's planted
cases (`extra.bench_toy`). References are measured once per site.

Writes metrics.csv, cases.csv (one row per case), summary.md (the confusion matrix, planted truth
× verdict, and each miss with its reason), illusion_benchmark.png. Thresholds are `check.*`, as
set: the rates are measured, never tuned toward the planted answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from mlpim import constants as C
from mlpim.analysis import illusion, planted
from mlpim.analysis import nullspace as ns
from mlpim.analysis import references as R
from mlpim.analysis.directions import das_basis
from mlpim.engine.interventions import prepare
from mlpim.experiments.common import model_for, paper_splits, require_ioi
from mlpim.report import io

log = logging.getLogger(__name__)
PLOT = "illusion_benchmark.png"
CASES = "cases.csv"
VERDICT_ORDER = ("no warning signs", "caution", "borderline", "likely illusory")


def thresholds(cfg: DictConfig) -> illusion.Thresholds:
    return illusion.Thresholds(**OmegaConf.to_container(cfg.check, resolve=True))


def bench_layers(cfg: DictConfig, model) -> list[int]:
    """The landmark MLP plus `extra.bench_layer_offsets`, inside the model."""
    mid = int(cfg.model.landmarks.mlp_in_the_middle)
    return [mid + o for o in cfg.extra.bench_layer_offsets if 0 <= mid + o < model.cfg.n_layers]


def layer_references(cfg, model, splits, kind: str, layer: int, th, run_dir: Path) -> R.Refs:
    """The references of one site (random MLP only at mlp_post)."""
    seeds = int(cfg.extra.random_mlp_seeds) if kind == "mlp_post" else 0
    opts = R.RefOptions(int(cfg.extra.n_random_directions), int(cfg.extra.n_natural), seeds,
                        cfg.extra.random_mlp_epochs, int(cfg.seed))  # fmt: skip
    refs = R.site_references(model, splits, kind, layer, opts, th.superadditive)
    if seeds <= 0:
        return refs
    _, rand = R.random_mlp_reference(cfg, model, splits, layer, opts, run_dir)
    return R.Refs(refs.random_dirs, rand, refs.natural_dormant, refs.natural_bridging)


def planted_directions(cfg, model, splits, target: Tensor, layer: int) -> dict[str, tuple]:
    """name -> (unit direction, truth, angle) at mlp_post of `layer`; the dormant part of the
    illusory ones is mapped by W_out onto `target` (the residual circuit direction)."""
    w_out = ns.mlp_w_out(model, layer)
    dh = planted.pattern_mean_diff(splits["train"])
    hidden = torch.cat([*planted.acts(splits["train"])])
    irr = planted.irrelevant_direction(w_out, dh)
    dor = planted.dormant_direction(w_out, hidden, target, cfg.extra.dormant_dims)
    cases = {f"illusory {a:g}°": (planted.mix(irr, dor, a), "illusory", a)
             for a in cfg.extra.bench_angles}  # fmt: skip
    row, _ = ns.split(dh, w_out)
    cases["real mean diff"] = (dh / dh.norm(), "real", float("nan"))
    cases["real row part"] = (row / row.norm(), "real", float("nan"))
    return cases


def verdict_class(label: str) -> str:
    """The verdict's word, borderline verdicts pooled (and "no effect to explain" without its
    numbers)."""
    if label.startswith(illusion.NO_EFFECT):
        return illusion.NO_EFFECT
    return "borderline" if label.startswith(illusion.BORDERLINE) else label


def case_row(name: str, truth: str, angle: float, layer, site: str, checks) -> dict:
    """One case: its truth, FLDD, verdict, which checks warned, and whether the verdict missed."""
    n, label = illusion.verdict(checks)
    effect = next(c for c in checks if c.name == "effect")
    matters = effect.value >= effect.threshold
    verdict = verdict_class(label)
    miss = (truth == "illusory" and matters and verdict != illusion.LIKELY_ILLUSORY) or (
        truth == "real" and verdict == illusion.LIKELY_ILLUSORY
    )
    warned = [c.name for c in checks if c.warning]
    reason = "; ".join(f"{c.name} {c.value:.3g} vs {c.threshold:.3g} ({illusion.warning_word(c)})"
                       for c in checks if c.warning is not None)  # fmt: skip
    return {"case": name, "truth": truth, "angle": angle, "layer": layer, "site": site,
            "fldd": effect.value, "matters": matters, "n_warnings": n, "verdict": verdict,
            "label": label, "warned": ", ".join(warned), "miss": miss, "reason": reason}  # fmt: skip


def layer_cases(cfg, model, layer: int, th, run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Every planted case at one middle MLP: (metric rows, case rows)."""
    splits = paper_splits(cfg, model, "mlp_post", layer, held_out=True)
    resid = {s: prepare(model, [p.pairs for p in ps], "resid_post", layer, cfg.method.engine)
             for s, ps in splits.items()}  # fmt: skip
    refs = layer_references(cfg, model, splits, "mlp_post", layer, th, run_dir)
    mean_diff = planted.pattern_mean_diff(resid["train"])
    v_resid = planted.oriented(
        das_basis(cfg, model, "resid_post", layer, None, run_dir, resid)[:, 0], mean_diff
    )
    rows, cases = [], []
    todo = planted_directions(cfg, model, splits, v_resid, layer)
    for name, (v, truth, angle) in tqdm(todo.items(), desc=f"planted cases L{layer}", leave=False):
        keys = {"site": "mlp_post", "layer": layer, "case": name, "seed": cfg.seed}
        r, checks = planted.measure_checks(model, splits, "mlp_post", layer, v, refs, th, keys)
        rows += r
        cases.append(case_row(name, truth, angle, layer, "mlp_post", checks))
    r, c = resid_cases(cfg, model, resid, layer, th, run_dir, v_resid, mean_diff)
    return rows + r, cases + c


def resid_cases(cfg, model, resid, layer: int, th, run_dir: Path, *real: Tensor):
    """(metric rows, case rows) of the real residual cases at resid_post of `layer`: v_resid
    and the mean difference."""
    refs = layer_references(cfg, model, resid, "resid_post", layer, th, run_dir)
    rows, out = [], []
    for name, v in zip(("real v_resid (DAS)", "real resid mean diff"), real, strict=True):
        keys = {"site": "resid_post", "layer": layer, "case": name, "seed": cfg.seed}
        r, checks = planted.measure_checks(model, resid, "resid_post", layer, v / v.norm(), refs,
                                           th, keys)  # fmt: skip
        rows += r
        out.append(case_row(name, "real", float("nan"), layer, "resid_post", checks))
    return rows, out


def toy_rows(th) -> list[dict]:
    """The toy model's planted cases (checks 0-3)."""
    out = []
    for name, (model, u, truth) in planted.toy_cases().items():
        checks = planted.toy_checks(model, u, th)
        out.append(case_row(name, truth, float("nan"), -1, "toy", checks))
    return out


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    require_ioi(cfg)
    model = model_for(cfg)
    th, rows, cases = thresholds(cfg), [], []
    for layer in tqdm(bench_layers(cfg, model), desc="illusion_benchmark: layers"):
        r, c = layer_cases(cfg, model, layer, th, run_dir)
        rows, cases = rows + r, cases + c
    if cfg.extra.bench_toy:
        cases += toy_rows(th)
    table = pd.DataFrame(cases)
    io.write_csv(table, run_dir, CASES)
    for c in cases:
        rows += io.metric_rows({"n_warnings": float(c["n_warnings"]), "miss": float(c["miss"])},
                               intervention=c["case"], site=c["site"], layer=c["layer"],
                               split="test", case=c["case"], seed=cfg.seed)  # fmt: skip
    io.write_text(summary_markdown(cfg, table), run_dir, C.SUMMARY)
    benchmark_plot(table, run_dir, f"{cfg.model.name}: illusion_check on planted cases")
    return io.tidy(rows, cfg)


def truth_class(row) -> str:
    """Planted truth, illusions too weak to matter apart."""
    if row.truth == "illusory" and not row.matters:
        return "illusory (FLDD below the gate)"
    return row.truth


def confusion(table: pd.DataFrame) -> pd.DataFrame:
    """Planted truth × verdict counts."""
    truth = table.apply(truth_class, axis=1)
    out = pd.crosstab(truth, table.verdict).reindex(columns=list(VERDICT_ORDER), fill_value=0)
    out.index.name = "planted"
    return out


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Misses and cases per site (from the metrics table)."""
    sub = df[df.metric.isin(["n_warnings", "miss"])]
    return sub.pivot_table(index=["site", "layer", "case"], columns="metric", values="value")


def summary_markdown(cfg: DictConfig, table: pd.DataFrame) -> str:
    """The confusion matrix, the rates, and each miss with its reason."""
    conf = confusion(table)
    ill = table[(table.truth == "illusory") & table.matters]
    real = table[table.truth == "real"]
    flagged = (ill.verdict == illusion.LIKELY_ILLUSORY).mean() if len(ill) else float("nan")
    false_alarm = (real.verdict == illusion.LIKELY_ILLUSORY).mean() if len(real) else float("nan")
    misses = table[table.miss][["case", "layer", "site", "fldd", "label", "reason"]]
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; layers {sorted(set(table.layer))} "
        f"(-1: toy); seed {cfg.seed}; thresholds check.* as set\n\n## Confusion matrix\n\n"
        f"{io.markdown_table(conf)}\n\nplanted illusions that matter flagged likely illusory: "
        f"{flagged:.0%} ({len(ill)}); planted real directions called likely illusory: "
        f"{false_alarm:.0%} ({len(real)})\n\n## Misses\n\n"
        f"{io.markdown_table(misses.set_index('case')) if len(misses) else 'none'}\n"
    )


def benchmark_plot(table: pd.DataFrame, run_dir: Path, title: str) -> None:
    """Left: the confusion matrix; right: each case's FLDD and warnings (crosses: misses)."""
    conf = confusion(table)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.imshow(conf.values, cmap="Blues")
    a.set(xticks=range(conf.shape[1]), yticks=range(conf.shape[0]))
    a.set_xticklabels(conf.columns, rotation=20, fontsize=7)
    a.set_yticklabels(conf.index, fontsize=7)
    for (i, j), n in pd.DataFrame(conf.values).stack().items():
        a.text(j, i, str(n), ha="center", va="center")
    a.set_title("planted truth × verdict", fontsize=9)
    for truth, color in (("illusory", "tab:red"), ("real", "tab:green")):
        sub = table[table.truth == truth]
        b.scatter(sub.fldd, sub.n_warnings, color=color, label=truth, alpha=0.7)
    miss = table[table.miss]
    b.scatter(miss.fldd, miss.n_warnings, marker="x", color="k", s=60, label="miss")
    b.set(xlabel="FLDD(v) on the test pairs", ylabel="warnings")
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, run_dir, PLOT)
