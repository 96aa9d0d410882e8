"""ioi_path_patching: through which downstream heads do v_resid, v_MLP and the full MLP patch act?

Interventions (at END, source BAB into base ABB and back, the test pairs): v_resid (DAS direction
at resid_post of the handover layer), v_MLP (DAS direction at mlp_post of the MLP in the middle),
mlp_full (the whole MLP patched), and `source_run` (the whole source prompt: the clean ABB vs BAB
difference the circuit itself produces). For each and each head after the site: ΔLD when only
that head's END output comes from the patched run (`ld_via_head_output`), ΔLD when only its END
query does (`ld_via_query`), and its DLA in the patched run (`dla`; intervention `clean`: the
unpatched run). See `mlpim.analysis.paths` for the definitions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import Tensor
from tqdm.auto import tqdm

from mlpim.analysis import paths
from mlpim.analysis.directions import saved_or_trained
from mlpim.engine import metrics
from mlpim.engine.models import hook_name, validate_site
from mlpim.engine.patching import Setter, full, subspace
from mlpim.experiments.common import model_for, require_ioi
from mlpim.report import io
from mlpim.tasks.ioi import PairBatch, paper_pairs

log = logging.getLogger(__name__)

SOURCE = "source_run"


@dataclass(frozen=True)
class Intervention:
    """A patch of one END site: setter(base activation, source activation) -> patched."""

    name: str
    kind: str
    layer: int
    setter: Setter


def direction(
    cfg: DictConfig, model, kind: str, layer: int, path: str | None, run_dir: Path, tag: str
) -> Tensor:
    """A 1-D (or k-D) DAS basis at (kind, layer): loaded from `path`, else trained and saved."""
    validate_site(model, kind, layer)
    return saved_or_trained(cfg, model, kind, layer, path, history=run_dir / f"history_{tag}.csv",
                            save_as=run_dir / f"subspace_{tag}.pt")  # fmt: skip


def interventions(cfg: DictConfig, model, run_dir: Path) -> list[Intervention]:
    """v_resid, v_MLP and the full MLP patch at the model's landmark layers."""
    marks, extra = cfg.model.landmarks, cfg.extra
    res, mlp = ("resid_post", int(marks.handover_layer)), ("mlp_post", int(marks.mlp_in_the_middle))
    v_resid = direction(cfg, model, *res, extra.resid_direction, run_dir, "resid")
    v_mlp = direction(cfg, model, *mlp, cfg.direction, run_dir, "mlp")
    return [
        Intervention("v_resid", *res, subspace(v_resid)),
        Intervention("v_mlp", *mlp, subspace(v_mlp)),
        Intervention("mlp_full", *mlp, full),
    ]


def _effects(model, state, r, clean, run, frozen: bool) -> dict[str, dict[int, Tensor]]:
    """Per-head path metrics and the MLP output paths of one patched (or source) run."""
    return {
        "ld_via_head_output": paths.output_effects(model, r, clean, run, frozen),
        "ld_via_query": paths.query_effects(model, state, r, clean, run, frozen),
        "dla": paths.head_dla(model, r, run),
        "ld_via_mlp_output": paths.mlp_effects(model, r, clean, run, frozen),
    }


def _outcome(model, pb: PairBatch, r: paths.Readout, run: paths.EndTrace) -> dict[str, Tensor]:
    """Per-prompt LD and whether the argmax is the patched answer."""
    logits = model.unembed(model.ln_final(run.final[:, None]))[:, 0]
    return {"logit_diff": paths.logit_diff(model, r, run.final),
            "hit": (logits.argmax(-1) == pb.label).float()}  # fmt: skip


def path_patch_batch(model, pb: PairBatch, todo: list[Intervention], frozen: bool = False) -> dict:
    """{intervention: {metric: {layer: per-prompt tensor}} | outcome} for one pair batch."""
    sites = sorted({(iv.kind, iv.layer) for iv in todo})
    state, clean, base_acts = paths.run_trace(model, pb.base, sites)
    _, source, src_acts = paths.run_trace(model, pb.source, sites)
    r = paths.readout(model, pb.base.io, pb.base.s)
    runs = {SOURCE: source}
    with torch.no_grad():
        for iv in todo:
            name = hook_name(iv.kind, iv.layer)
            act = iv.setter(base_acts[name], src_acts[name])
            runs[iv.name] = paths.patched_trace(model, state, clean, iv.kind, iv.layer, act)
        out = {"clean": {"dla": paths.head_dla(model, r, clean), **_outcome(model, pb, r, clean)}}
        for name, run in runs.items():
            out[name] = _effects(model, state, r, clean, run, frozen) | _outcome(model, pb, r, run)
    return out


def _cat(parts: list) -> Tensor | dict:
    """Concatenate per-batch results along the prompt axis (nested dicts keep their keys)."""
    if isinstance(parts[0], dict):
        return {k: _cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _rows(name: str, res: dict, clean_ld: Tensor) -> list[dict]:
    """Tidy rows of one intervention: per head, per MLP, and its overall LD / FLDD / IIA."""
    rows = []
    for metric, by_layer in res.items():
        if metric in ("logit_diff", "hit"):
            continue
        site = "mlp_out" if metric == "ld_via_mlp_output" else "z"
        for layer, t in by_layer.items():
            mean = t.mean(0).reshape(-1).tolist()
            heads = range(len(mean)) if site == "z" else [-1]
            rows += [{"intervention": name, "site": site, "layer": layer, "head": h,
                      "metric": metric, "value": v} for h, v in zip(heads, mean, strict=True)]  # fmt: skip
    ld = res["logit_diff"]
    overall = {"logit_diff": ld.mean().item(), "fldd": metrics.fldd(ld, clean_ld),
               "iia": res["hit"].mean().item(), "flip_rate": metrics.flip_rate(ld, clean_ld)}  # fmt: skip
    return rows + io.metric_rows(overall, intervention=name, site="logits", layer=-1, head=-1)


def path_patch(
    model, batches: list[PairBatch], todo: list[Intervention], frozen: bool = False
) -> pd.DataFrame:
    """Tidy table (mean over all pairs) of every intervention's path-patching metrics."""
    parts = [path_patch_batch(model, pb, todo, frozen) for pb in tqdm(batches, desc="path patch")]
    res = _cat(parts)
    clean_ld = res["clean"]["logit_diff"]
    rows = [row for name, r in res.items() for row in _rows(name, r, clean_ld)]
    return pd.DataFrame(rows)


def _grid(df: pd.DataFrame, name: str, metric: str, layers: list[int]) -> pd.DataFrame:
    sub = df[(df.intervention == name) & (df.metric == metric) & (df.site == "z")]
    return sub.pivot_table(index="layer", columns="head", values="value").reindex(layers)


def _lim(*grids: pd.DataFrame) -> float:
    """Symmetric colour limit shared by `grids`."""
    return max(max(float(abs(g.fillna(0).values).max()) for g in grids), 1e-9)


def _panel(fig, ax, data: pd.DataFrame, title: str, lim: float, label: str) -> None:
    im = ax.imshow(data.values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set(xticks=range(data.shape[1]), xticklabels=data.columns, yticks=range(len(data)),
           yticklabels=data.index, xlabel="head", ylabel="layer")  # fmt: skip
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label=label)


def heatmaps(df: pd.DataFrame, run_dir: Path, title: str, first_layer: int) -> None:
    """Layer × head heatmaps: clean DLA, then per intervention its DLA with the intervention,
    the change of DLA, and the ΔLD routed through each head's output and through its query
    (the three ΔLD panels of a row share one colour scale)."""
    layers = sorted(int(v) for v in df[df.site == "z"].layer.unique() if v >= first_layer)
    names = [n for n in df.intervention.unique() if n != "clean"]
    height = (len(names) + 1) * (0.25 * len(layers) + 1.6)
    fig, axes = plt.subplots(len(names) + 1, 4, figsize=(17, height), squeeze=False,
                             layout="constrained")  # fmt: skip
    clean = _grid(df, "clean", "dla", layers)
    _panel(fig, axes[0, 0], clean, "clean: dla (no intervention)", _lim(clean), "LD")
    for ax in axes[0, 1:]:
        ax.axis("off")
    for row, name in zip(axes[1:], names, strict=True):
        with_ = _grid(df, name, "dla", layers)
        deltas = {"dla change (with - without)": with_ - clean,
                  "ld via head output": _grid(df, name, "ld_via_head_output", layers),
                  "ld via query": _grid(df, name, "ld_via_query", layers)}  # fmt: skip
        _panel(fig, row[0], with_, f"{name}: dla with intervention", _lim(with_, clean), "LD")
        lim = _lim(*deltas.values())
        for ax, (what, grid) in zip(row[1:], deltas.items(), strict=True):
            _panel(fig, ax, grid, f"{name}: {what}", lim, "ΔLD")
    fig.suptitle(title)
    io.save_figure(fig, run_dir, "path_patching.png")


def top_heads(df: pd.DataFrame, name: str, metric: str = "ld_via_head_output", n: int = 6) -> str:
    """The n heads with the largest |metric| for an intervention, as 'LlHh (value)'."""
    sub = df[(df.intervention == name) & (df.metric == metric) & (df.site == "z")]
    sub = sub.reindex(sub.value.abs().sort_values(ascending=False).index).head(n)
    return ", ".join(f"L{r.layer}H{r.head} ({r.value:+.3g})" for r in sub.itertuples())


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per intervention: LD, FLDD, IIA, and the sums of the per-head path effects."""
    overall = df[df.site == "logits"].pivot_table(
        index="intervention", columns="metric", values="value", sort=False
    )
    z = df[df.site == "z"].pivot_table(
        index="intervention", columns="metric", values="value", aggfunc="sum", sort=False
    )
    sums = z.drop(columns="dla").add_prefix("sum ")
    return overall.join(sums)


def summary_markdown(cfg: DictConfig, df: pd.DataFrame) -> str:
    """The summary table and the top heads of each intervention."""
    lines = [f"# {cfg.experiment}\n", f"model: {cfg.model.name}; test pairs ABB<->BAB; "
             f"seed {cfg.seed}\n", io.markdown_table(summarize(df)), ""]  # fmt: skip
    for name in [n for n in df.intervention.unique() if n != "clean"]:
        lines += [f"- {name}: via head output {top_heads(df, name)}; "
                  f"via query {top_heads(df, name, 'ld_via_query')}"]  # fmt: skip
    lines += [f"- clean dla: {top_heads(df, 'clean', 'dla')}"]
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    require_ioi(cfg)
    model = model_for(cfg)
    todo = interventions(cfg, model, run_dir)
    batches = [b.to(model.cfg.device)
               for b in paper_pairs(model.tokenizer, cfg.dataset, "test", cfg.seed)]  # fmt: skip
    frozen = bool(cfg.extra.frozen_norm)
    df = path_patch(model, batches, todo, frozen).assign(split="test")
    df = io.tidy(df.to_dict("records"), cfg)
    first = min(iv.layer for iv in todo) + 1
    heatmaps(df, run_dir, f"{cfg.experiment}: {cfg.model.name}, ABB<->BAB", first)
    io.write_text(summary_markdown(cfg, df), run_dir, "summary.md")
    return df
