"""ioi_dormant: patching v_MLP wakes a dormant pathway (the post's MLP-output-on-v_true figure).

v_MLP is the DAS direction in the middle MLP's hidden activations (`mlp_post`), v_true the DAS
direction in the residual stream at the handover layer (`resid_post`). For prompts with disjoint
names (ABB/BAB vs CDD/DCD, both ways), the MLP's END output projected on v_true is compared with
and without the v_MLP patch: near zero unpatched and for same-position patches, large for
opposite-position ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from omegaconf import DictConfig
from torch import Tensor

from mlpim import constants as C
from mlpim.analysis import nullspace as ns
from mlpim.analysis.directions import das_basis
from mlpim.engine import fastpath
from mlpim.engine.interventions import Prepared, clean_metrics, evaluate, prepare
from mlpim.engine.models import ConfigError
from mlpim.engine.patching import subspace, subspace_patch
from mlpim.experiments.common import model_for, require_ioi, site_of
from mlpim.report import io
from mlpim.tasks.ioi import make_pairs, s1_position

log = logging.getLogger(__name__)

NAMED = ("ABB", "BAB")  # the base-side names
FRESH = ("CDD", "DCD")  # disjoint names
PROJECTIONS = "projections.csv"


def dormant_combos() -> list[tuple[str, str]]:
    """(base, source) pairs: ABB/BAB from CDD/DCD and the reverse; half of them same-position."""
    into_named = [(b, s) for b in NAMED for s in FRESH]
    return into_named + [(b, s) for b in FRESH for s in NAMED]


def combo_name(base: str, source: str) -> str:
    """The post's label `source->base` (e.g. DCD->ABB: patch from DCD into ABB)."""
    return f"{source}->{base}"


def same_position(base: str, source: str) -> bool:
    """Both prompts repeat the name in one place: the patch should change nothing."""
    return s1_position(base) == s1_position(source)


def mlp_out_projection(
    model, layer: int, post: Float[Tensor, "b m"], v_true: Float[Tensor, "d k"]
) -> Float[Tensor, b]:
    """The MLP's END output (from its hidden activations) projected on v_true's first column."""
    return ns.projections(fastpath.mlp_out_from_post(model, layer, post), v_true[:, 0])


def combo_projections(
    model, prepared: list[Prepared], layer: int, v_mlp: Tensor, v_true: Tensor
) -> tuple[Float[Tensor, n], Float[Tensor, n]]:
    """(patched, unpatched) projections of the MLP output on v_true over all pairs of a combo."""
    patched, clean = [], []
    with torch.no_grad():
        for p in prepared:
            moved = subspace_patch(p.base_act, p.source_act, v_mlp)
            patched.append(mlp_out_projection(model, layer, moved, v_true))
            clean.append(mlp_out_projection(model, layer, p.base_act, v_true))
    return torch.cat(patched).cpu(), torch.cat(clean).cpu()


def projection_stats(patched: Tensor, clean: Tensor) -> dict[str, dict[str, float]]:
    """proj_mean/proj_std per intervention and the dormant ratio |mean patched| / std unpatched."""
    ratio = patched.mean().abs().item() / max(clean.std().item(), 1e-12)
    das = {"proj_mean": patched.mean().item(), "proj_std": patched.std().item()}
    return {
        "clean": {"proj_mean": clean.mean().item(), "proj_std": clean.std().item()},
        "das": das | {"dormant_ratio": ratio},
    }


def combo_rows(
    cfg: DictConfig, model, combo: tuple[str, str], index: int, layer: int,
    v_mlp: Tensor, v_true: Tensor,
) -> tuple[list[dict], pd.DataFrame]:  # fmt: skip
    """Metric rows and raw projections of one (base, source) combo."""
    split, n = cfg.extra.split, cfg.extra.n_per_combo
    batches = make_pairs(model.tokenizer, cfg.dataset, split, [combo], n, cfg.seed + index)
    batches = [b.to(model.cfg.device) for b in batches]
    prepared = prepare(model, batches, "mlp_post", layer, cfg.method.engine)
    patched, clean = combo_projections(model, prepared, layer, v_mlp, v_true)
    stats = projection_stats(patched, clean)
    keys = {"site": "mlp_post", "layer": layer, "split": split, "combo": combo_name(*combo),
            "same_position": same_position(*combo), "n": len(clean)}  # fmt: skip
    rows = io.metric_rows(clean_metrics(prepared) | stats["clean"], intervention="clean", **keys)
    patch = evaluate(model, prepared, subspace(v_mlp))
    rows += io.metric_rows(patch | stats["das"], intervention="das", **keys)
    raw = pd.DataFrame({"combo": keys["combo"], "same_position": keys["same_position"],
                        "patched": patched.numpy(), "unpatched": clean.numpy()})  # fmt: skip
    return rows, raw


def plot_dormant(raw: pd.DataFrame, run_dir: Path, title: str) -> None:
    """One panel per combo: projection histograms, patched solid, unpatched dashed."""
    combos = list(dict.fromkeys(raw.combo))
    ncols = 4
    nrows = -(-len(combos) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), sharex=True)
    values = np.concatenate([raw.patched, raw.unpatched])
    bins = np.linspace(values.min(), values.max(), 41)
    for ax, combo in zip(np.ravel(axes), combos, strict=False):
        sub = raw[raw.combo == combo]
        same = bool(sub.same_position.iloc[0])
        color = "tab:blue" if same else "tab:red"
        ax.hist(sub.patched, bins=bins, histtype="step", color=color, lw=1.6, label="patched")
        ax.hist(sub.unpatched, bins=bins, histtype="step", color=color, ls="--", label="unpatched")
        ax.axvline(0, color="gray", lw=0.6)
        ax.locator_params(axis="x", nbins=4)
        ax.set_title(f"{combo} ({'same' if same else 'opposite'})", fontsize=9)
    for ax in np.ravel(axes)[len(combos) :]:
        ax.axis("off")
    np.ravel(axes)[0].legend(fontsize=7)
    fig.supxlabel("MLP output at END projected on v_true")
    fig.suptitle(title)
    fig.tight_layout()
    io.save_figure(fig, run_dir, "dormant.png")


def layer_note(mlp_layer: int, resid_layer: int) -> str:
    """Whether MLP `mlp_layer`'s output is part of resid_post `resid_layer` at all."""
    if mlp_layer <= resid_layer:
        return f"MLP {mlp_layer} writes into the residual before resid_post {resid_layer}."
    return (
        f"WARNING: MLP {mlp_layer} comes after resid_post {resid_layer}: its output is not part "
        "of the residual that v_true was found in; the projection is computed anyway."
    )


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per combo: projection mean/std (patched, unpatched), dormant ratio, patch FLDD/IIA."""
    wide = df.pivot_table(
        index="combo", columns=["intervention", "metric"], values="value", sort=False
    )
    cols = {
        ("das", "proj_mean"): "proj patched", ("das", "proj_std"): "sd patched",
        ("clean", "proj_mean"): "proj clean", ("clean", "proj_std"): "sd clean",
        ("das", "dormant_ratio"): "dormant ratio", ("das", "fldd"): "FLDD",
        ("das", "iia"): "IIA", ("clean", "logit_diff"): "LD clean", ("das", "logit_diff"): "LD",
    }  # fmt: skip
    out = wide[list(cols)]
    out.columns = list(cols.values())
    return out


def summary_markdown(cfg: DictConfig, df: pd.DataFrame, mlp_layer: int, resid_layer: int) -> str:
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; v_MLP: mlp_post L{mlp_layer}; "
        f"v_true: resid_post L{resid_layer}; seed {cfg.seed}\n\n{layer_note(mlp_layer, resid_layer)}"
        f"\n\n{io.markdown_table(summarize(df))}\n"
    )


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    require_ioi(cfg)
    model = model_for(cfg)
    kind, mlp_layer = site_of(cfg, model)
    if kind != "mlp_post":
        raise ConfigError(f"ioi_dormant patches v_MLP at mlp_post, not {kind}")
    resid_layer = int(cfg.extra.resid_layer)
    note = layer_note(mlp_layer, resid_layer)
    (log.warning if mlp_layer > resid_layer else log.info)(note)
    v_mlp = das_basis(cfg, model, "mlp_post", mlp_layer, cfg.direction, run_dir)
    v_true = das_basis(cfg, model, "resid_post", resid_layer, cfg.extra.resid_direction, run_dir)
    rows, raws = [], []
    for i, combo in enumerate(dormant_combos()):
        r, raw = combo_rows(cfg, model, combo, i, mlp_layer, v_mlp, v_true)
        rows, raws = rows + r, [*raws, raw]
    df = io.tidy(rows, cfg).assign(
        v_true_layer=resid_layer, mlp_after_handover=mlp_layer > resid_layer
    )
    raw = pd.concat(raws, ignore_index=True)
    io.write_csv(raw, run_dir, PROJECTIONS)
    title = f"{cfg.model.name}: MLP{mlp_layer} output on v_true (resid_post L{resid_layer})"
    plot_dormant(raw, run_dir, title)
    io.write_text(summary_markdown(cfg, df, mlp_layer, resid_layer), run_dir, C.SUMMARY)
    return df
