"""ioi_nullspace: split the middle MLP's DAS direction v_MLP into its W_out row-space and nullspace
parts, compare how each separates ABB from ABA prompts, and patch along each part.

Interventions (1-D patches use the unit vector, as the paper's "patching along proj"):
`das` (v), `row_proj` (proj/‖proj‖), `null_proj` (null_proj/‖null_proj‖), `span2` (the 2-D span
of both, which contains v: it is the sum of the two 1-D patches, and the nullspace one changes no
output, so `span2` always equals `row_proj`, the paper's "patching both loses the effect") and
`full` (the whole MLP hidden activation). ‖proj‖² and ‖null_proj‖² (metric `norm_sq`) are those
of the unit v, so they add up to 1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import Tensor

from mlpim import constants as C
from mlpim.analysis import nullspace as ns
from mlpim.analysis.controls import PARTS, intervention_bases, patching_rows
from mlpim.analysis.mlp_write import MODULE_OUT
from mlpim.engine.batch import PromptBatch
from mlpim.engine.direction import Direction
from mlpim.engine.models import hook_name
from mlpim.engine.patching import run_cache, site_acts
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import das_direction, model_for, model_spec, paper_splits, site_of
from mlpim.options import IoiNullspaceOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.report.plots import table1_plot
from mlpim.tasks.ioi import IOIBatch, make_prompts

log = logging.getLogger(__name__)
HIST_PATTERNS = ("ABB", "ABA")


def check_w_out(model, layer: int, batch: PromptBatch) -> float:
    """Max |hidden @ W_out (+ b_out) - the MLP module's output| over the prompts; raises if not
    ~0 (within 1e-4 of the output's scale, or 4 eps of a 16-bit dtype). The module's output, not
    what the block adds to the residual: Gemma 2/3 normalise it first (`mlpim.analysis.mlp_write`)."""
    names = [hook_name("mlp_post", layer), MODULE_OUT.format(layer=layer)]
    _, cache = run_cache(model, batch, names)
    w, b = ns.mlp_w_out(model, layer), ns.mlp_b_out(model, layer)
    out = cache[names[1]]
    err = (ns.mlp_output(cache[names[0]], w, b) - out).abs().max().item()
    if err > max(1e-4, 4 * torch.finfo(out.dtype).eps) * max(out.abs().max().item(), 1.0):
        raise RuntimeError(f"hidden @ W_out + b_out differs from the MLP's output by {err:.2e}")
    return err


def end_activations(model, batches: list[IOIBatch], kind: str, layer: int) -> dict[str, Tensor]:
    """END activations at the site per prompt pattern, [n, width] each."""
    name, acts = hook_name(kind, layer), {}
    for b in batches:
        for pat, a in zip(b.pattern, site_acts(model, b, [name])[name], strict=True):
            acts.setdefault(pat, []).append(a)
    return {p: torch.stack(a) for p, a in acts.items()}


def histogram_stats(acts: dict[str, Tensor], parts: dict[str, Tensor]) -> dict[str, dict]:
    """Per part: the two groups' separation and the gap of their mean projections (IOI: ABB
    minus ABA; other tasks: base minus source prompts)."""
    out = {}
    for name, vec in parts.items():
        a, b = (ns.projections(x, vec) for x in acts.values())
        out[name] = {"separation": ns.separation(a, b), "mean_gap": (a.mean() - b.mean()).item()}
    return out


def histogram_plot(acts, parts, stats, run_dir: Path, title: str) -> None:
    """Histograms of the site's activations projected on each part, one colour per group."""
    fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.3), squeeze=False)
    for ax, (name, vec) in zip(axes[0], parts.items(), strict=True):
        proj = {group: ns.projections(x, vec).cpu() for group, x in acts.items()}
        bins = torch.linspace(
            min(p.min() for p in proj.values()).item(),
            max(p.max() for p in proj.values()).item(),
            31,
        )
        for (pat, values), color in zip(proj.items(), ("tab:blue", "tab:orange"), strict=True):
            ax.hist(values, bins=bins, alpha=0.6, color=color, label=pat)
        ax.set(title=f"onto {name} (sep {stats[name]['separation']:.2f})", xlabel="h · part")
        ax.legend()
    fig.suptitle(title, y=1.03)
    io.save_figure(fig, run_dir, "nullspace_hist.png")


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """v_MLP's row/null parts: patching along each, their norms and histograms; the metrics."""
    opts = options(cfg, Options)
    model = model_for(cfg)
    kind, layer = site_of(cfg, model)
    if kind != "mlp_post":
        raise ConfigError(f"ioi_nullspace needs site=mlp_post (MLP hidden activations), not {kind}")
    splits = paper_splits(cfg, model, kind, layer)
    v = das_direction(cfg, model, kind, layer, directions.get("direction"), run_dir, splits)
    w_out = ns.mlp_w_out(model, layer)
    w_err = check_w_out(model, layer, splits["test"][0].pairs.base)
    proj, null = ns.split(v, w_out)
    keys = {"site": kind, "layer": layer, "dim": 1, "seed": cfg.seed}
    rows = patching_rows(model, splits, intervention_bases(v, proj, null), kind, layer, keys)
    for name, part in zip(PARTS, (proj, null), strict=True):
        rows += io.metric_rows(
            {"norm_sq": part.norm().item() ** 2}, intervention=name, split="train", **keys
        )
    parts = {"das": v, "row_proj": proj, "null_proj": null}
    rows += hist_rows(cfg, opts, model, kind, layer, parts, run_dir, keys, splits)
    df = io.tidy(rows, cfg)
    meta = direction_meta(model, model_spec(cfg), kind, layer)  # the weights: refused on others
    parts = {"proj": proj.cpu(), "null_proj": null.cpu()}
    save_subspace(
        run_dir / C.DIRECTION, v[:, None], method="das", **parts, k=1, seed=cfg.seed, **meta
    )
    io.write_text(summary_markdown(cfg, df, layer, w_err), run_dir, C.SUMMARY)
    table1_plot(df, run_dir, f"{cfg.experiment}: {cfg.model.name}, {kind} L{layer}")
    return df


def hist_groups(
    cfg, opts: Options, model, kind: str, layer: int, splits
) -> tuple[str, dict[str, Tensor]]:
    """(split, two groups of site activations): IOI, ABB vs ABA prompts (which name repeats
    varies, the position signal does not); other tasks, the test pairs' base vs source."""
    if cfg.dataset.name != "ioi":
        test = splits["test"]
        base = torch.cat([p.base_act for p in test])
        return "test", {"base": base, "source": torch.cat([p.source_act for p in test])}
    split, n = opts.hist_split, opts.n_hist_prompts
    prompts = make_prompts(model.tokenizer, cfg.dataset, split, HIST_PATTERNS, n, cfg.seed)
    acts = end_activations(model, [b.to(model.cfg.device) for b in prompts], kind, layer)
    return split, {p: acts[p] for p in HIST_PATTERNS}


def hist_rows(
    cfg, opts: Options, model, kind, layer, parts: dict[str, Tensor], run_dir, keys, splits
) -> list[dict]:
    """Projections of two groups: stats as rows (split = the prompts' split) and the plot."""
    split, acts = hist_groups(cfg, opts, model, kind, layer, splits)
    stats = histogram_stats(acts, parts)
    title = f"{cfg.model.name} {kind} L{layer}: END activations, {split} prompts"
    histogram_plot(acts, {k: parts[k] for k in PARTS}, stats, run_dir, title)
    rows = []
    for name, values in stats.items():
        rows += io.metric_rows(values, intervention=name, split=split, **keys)
    return rows


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Rows interventions; columns metric (split)."""
    return io.summary_table(df)


def summary_markdown(cfg: DictConfig, df: pd.DataFrame, layer: int, w_err: float) -> str:
    """summary.md: the W_out check and the table of interventions."""
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; site: mlp_post, layer {layer}; seed "
        f"{cfg.seed}\n\nmax |hidden @ W_out + b_out - MLP output| = {w_err:.2e}\n\n"
        f"1-D patches use unit vectors; norm_sq is that of the parts of the unit v.\n\n"
        f"{io.markdown_table(summarize(df))}\n"
    )


EXPERIMENT = Experiment(run=run, options=Options, summarize=summarize)
