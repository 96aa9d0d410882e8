"""ioi_alignment: does the middle MLP's DAS direction write along the real position direction?

Cosines between v_mlp_out = v_MLP @ W_out (what the MLP writes when activated along v_MLP) and two
estimates of v_true at the handover residual (resid_post): the DAS direction (`das_resid`) and the
gradient of the name movers' attention score to IO minus to S1 (`grad_resid`). The baseline is
r @ W_out for random unit hidden directions r. A DAS direction's sign is arbitrary, so every
`cosine` and the random baseline are absolute values. The gradient is signed per prompt (first
name minus second name): the IO − S1 difference flips its position part between ABB and BAB, so
an unsigned average over a balanced set would cancel; `grad_abb_vs_bab` reports how well the two
patterns' signed gradients agree (cos of their means; signed, not absolute).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from jaxtyping import Float
from omegaconf import DictConfig
from torch import Tensor

from mlpim.analysis import nullspace as ns
from mlpim.analysis.mlp_write import residual_w_out
from mlpim.engine import metrics
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import patch_each
from mlpim.engine.models import hook_name
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import das_direction, model_for, require_ioi
from mlpim.options import IoiAlignmentOptions, options
from mlpim.report import io
from mlpim.tasks.ioi import IOIBatch, make_pairs, make_prompts

log = logging.getLogger(__name__)
Head = tuple[int, int]


def name_mover_objective(
    model, batch: IOIBatch, layer: int, heads: list[Head], delta: Float[Tensor, "b d"]
) -> Float[Tensor, " b"]:
    """Mean over `heads` of the END attention score (pre-softmax) to IO minus to S1, with `delta`
    added to resid_post of `layer` at END."""

    def add(act: Tensor, hook=None) -> Tensor:
        act = act.clone()
        act[:, -1] = act[:, -1] + delta
        return act

    scores: dict[int, Tensor] = {}

    def grab(act: Tensor, hook) -> Tensor:
        scores[int(hook.name.split(".")[1])] = act[:, :, -1]  # [b, heads, key]
        return act

    hooks = [(hook_name("resid_post", layer), add)]
    hooks += [(f"blocks.{lh}.attn.hook_attn_scores", grab) for lh in sorted({h[0] for h in heads})]
    model.run_with_hooks(batch.tokens, attention_mask=batch.mask, fwd_hooks=hooks)
    rows = torch.arange(len(batch), device=batch.tokens.device)
    diffs = [
        scores[lh][rows, h, batch.io_pos] - scores[lh][rows, h, batch.s1_pos] for lh, h in heads
    ]
    return torch.stack(diffs).mean(0)


def name_mover_gradients(
    model, batch: IOIBatch, layer: int, heads: list[Head]
) -> Float[Tensor, "b d"]:
    """Per prompt: gradient of `name_mover_objective` w.r.t. resid_post[layer] at END."""
    if min(h[0] for h in heads) <= layer:
        raise ConfigError(f"name-mover heads {heads} must lie after the handover layer {layer}")
    delta = torch.zeros(len(batch), model.cfg.d_model, device=batch.tokens.device)
    delta.requires_grad_(True)
    with torch.enable_grad():
        objective = name_mover_objective(model, batch, layer, heads, delta).sum()
        (grad,) = torch.autograd.grad(objective, delta)
    return grad


def signed_gradients(
    model, batches: list[IOIBatch], layer: int, heads: list[Head]
) -> tuple[Float[Tensor, "n d"], Float[Tensor, " n"]]:
    """Per prompt, the first-name-minus-second-name score's gradient at END, and its sign."""
    grads, signs = [], []
    for b in batches:
        sign = torch.where(b.io_pos < b.s1_pos, 1.0, -1.0).to(b.tokens.device)
        grads.append(name_mover_gradients(model, b, layer, heads) * sign[:, None])
        signs.append(sign)
    return torch.cat(grads), torch.cat(signs)


def gradient_direction(grads: Float[Tensor, "n d"]) -> Float[Tensor, " d"]:
    """The signed per-prompt gradients averaged over all prompts, normalised."""
    g = grads.mean(0)
    return g / g.norm()


def pattern_agreement(grads: Float[Tensor, "n d"], signs: Float[Tensor, " n"]) -> float:
    """cos(mean signed gradient over IO-first prompts, over S1-first prompts)."""
    return ns.cosine(grads[signs > 0].mean(0), grads[signs < 0].mean(0))


def head_fldd(model, cfg: DictConfig, layer: int, n: int) -> dict[Head, float]:
    """FLDD of patching each head after `layer` (hook_z at END) on `n` train ABB<->BAB pairs
    per direction."""
    combos = [("ABB", "BAB"), ("BAB", "ABB")]
    batches = make_pairs(model.tokenizer, cfg.dataset, "train", combos, n, cfg.seed)
    heads = range(model.cfg.n_heads)
    todo = [("z", lh, h) for lh in range(layer + 1, model.cfg.n_layers) for h in heads]
    batches = [b.to(model.cfg.device) for b in batches]
    results, clean = patch_each(model, batches, todo, cfg.method.engine)
    return {(lh, h): metrics.fldd(ld, clean) for (_, lh, h), (ld, _) in results.items()}


def name_movers(
    model, cfg: DictConfig, layer: int, n_pairs: int, top: int = 3
) -> tuple[list[Head], dict]:
    """The configured name movers, else the `top` heads after `layer` by |FLDD| (and all FLDDs)."""
    listed = [tuple(int(x) for x in h) for h in cfg.model.landmarks.name_movers]
    if listed:
        return listed, {}
    fldd = head_fldd(model, cfg, layer, n_pairs)
    chosen = sorted(fldd, key=lambda h: -abs(fldd[h]))[:top]
    log.info("no name movers in the config; top heads by |FLDD|: %s", chosen)
    return chosen, fldd


def cosine_rows(dirs: dict[str, Tensor], w_out: Tensor, n: int, seed: int) -> tuple[list, dict]:
    """|cos| of the three pairs and the random baseline per v_true (rows, random |cos| samples)."""
    pairs = [("v_mlp_out", "das_resid"), ("v_mlp_out", "grad_resid"), ("das_resid", "grad_resid")]
    rows = [
        {
            "intervention": f"{a}_vs_{b}",
            "metric": "cosine",
            "value": abs(ns.cosine(dirs[a], dirs[b])),
        }
        for a, b in pairs
    ]
    randoms = {}
    for target in ("das_resid", "grad_resid"):
        gen = torch.Generator().manual_seed(seed)
        randoms[target] = ns.random_output_cosines(w_out, dirs[target], n, gen).abs().cpu()
        stats = {
            "random_cosine_mean": randoms[target].mean().item(),
            "random_cosine_q95": randoms[target].quantile(0.95).item(),
        }
        rows += [
            {"intervention": f"random_vs_{target}", "metric": m, "value": v}
            for m, v in stats.items()
        ]
    return rows, randoms


def alignment_plot(rows: list[dict], randoms: dict[str, Tensor], run_dir: Path, title: str):
    """Histograms of random-direction |cos| with the measured |cos| as vertical lines."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for (target, cos), color in zip(randoms.items(), ("tab:blue", "tab:orange"), strict=True):
        ax.hist(cos, bins=40, alpha=0.5, color=color, label=f"random r: |cos(r W_out, {target})|")
    measured = [
        r for r in rows if r["metric"] == "cosine" and r["intervention"] != "grad_abb_vs_bab"
    ]
    for r, color in zip(measured, ("tab:blue", "tab:orange", "k"), strict=True):
        ax.axvline(r["value"], color=color, ls="--", label=f"{r['intervention']}: {r['value']:.3f}")
    ax.set(title=title, xlabel="|cosine|", ylabel="count", xlim=(0, 1))
    ax.legend(fontsize=7)
    io.save_figure(fig, run_dir, "alignment.png")


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """The cosines of v_MLP's output, v_resid and the name movers' gradient; the metrics."""
    require_ioi(cfg)
    opts = options(cfg, IoiAlignmentOptions)
    model = model_for(cfg)
    marks = cfg.model.landmarks
    mid, handover = int(marks.mlp_in_the_middle), int(marks.handover_layer)
    v_mlp = das_direction(
        cfg, model, "mlp_post", mid, directions.get("direction"), run_dir / "das_mlp_post"
    )
    resid = directions.get("extra.resid_direction")
    v_resid = das_direction(cfg, model, "resid_post", handover, resid, run_dir / "das_resid")
    heads, fldd = name_movers(model, cfg, handover, opts.n_head_pairs)
    patterns = ("ABB", "BAB")
    prompts = make_prompts(
        model.tokenizer, cfg.dataset, "train", patterns, opts.n_grad_prompts, cfg.seed
    )
    grads, signs = signed_gradients(
        model, [b.to(model.cfg.device) for b in prompts], handover, heads
    )
    grad = gradient_direction(grads)
    w_out = residual_w_out(model, mid, prompts)  # W_out, or through Gemma's post-norm
    dirs = {"v_mlp_out": ns.written(v_mlp, w_out), "das_resid": v_resid, "grad_resid": grad}
    rows, randoms = cosine_rows(dirs, w_out, opts.n_random, cfg.seed)
    rows.append(
        {
            "intervention": "grad_abb_vs_bab",
            "metric": "cosine",
            "value": pattern_agreement(grads, signs),
        }
    )
    rows += [
        {"intervention": f"head_L{lh}H{h}", "metric": "head_fldd", "value": v}
        for (lh, h), v in fldd.items()
        if (lh, h) in heads
    ]
    keys = {"site": "mlp_post", "layer": mid, "split": "train", "seed": cfg.seed}
    df = io.tidy([{**keys, **r} for r in rows], cfg)
    title = f"{cfg.model.name}: MLP{mid} output vs resid_post{handover}"
    alignment_plot(rows, randoms, run_dir, title)
    io.write_text(summary_markdown(cfg, df, mid, handover, heads), run_dir, "summary.md")
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Rows pairs of directions; columns metrics."""
    return df.pivot_table(index="intervention", columns="metric", values="value", sort=False)


def summary_markdown(cfg, df: pd.DataFrame, mid: int, handover: int, heads: list[Head]) -> str:
    """summary.md: the cosines against the random baseline, and the heads used."""
    return (
        f"# {cfg.experiment}\n\nmodel: {cfg.model.name}; v_MLP at mlp_post L{mid}; v_true at "
        f"resid_post L{handover}; name-mover heads (layer, head): {heads}; seed {cfg.seed}\n\n"
        f"All cosines are absolute values except grad_abb_vs_bab (signed: the IO-first and S1-first "
        f"prompts' signed name-mover gradients, cos of their means).\n\n{io.markdown_table(summarize(df))}\n"
    )


EXPERIMENT = Experiment(
    run=run,
    options=IoiAlignmentOptions,
    summarize=summarize,
    inputs={"extra.resid_direction": None},
)
