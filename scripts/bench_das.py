"""Time one DAS epoch four ways, side by side: the END-only kernel (where it applies), the
generic KV-cache engine, the plain full forward, and pyvene; and each engine's preparation.

Usage (flags first, then Hydra overrides for `mlpim.config.compose`):

    .venv/bin/python scripts/bench_das.py [--epochs N] [--threads N] [--plain-batches N]
        [--warmup N] [--min-seconds S] [--out path.csv] model=smollm2-135m [site=... ...]

All paths use the same model, the same training pairs
(`paper_pairs(tokenizer, cfg.dataset, "train", cfg.seed)`), the same site (default `mlp_post` at
the model's MLP-in-the-middle landmark, k = `method.dim`), the same initial basis, batch size,
thread count and optimiser (Adam, lr `method.lr`, CE over the full vocabulary at END):

  (a) kernel `prepare(..., engine="kernel")` (GPT-2/Llama/Gemma 3 shapes only; the family's
             `kernel_refusal` says why not elsewhere) + the `train_das` inner loop (END-only
             resume, unembedding fused with the cross-entropy),
  (b) cache  `prepare(..., engine="cache")`: the model's own forward resumed from its own KV
             cache (any architecture); unembedding fused with the cross-entropy where the
             model's logits are linear in the unembedding's input (`linear_unembed`),
  (c) plain  `prepare(..., engine="full")` + the same loop (full forward with a TransformerLens
             hook, then `cross_entropy` of the END logits),
  (d) pyvene 0.1.8 `IntervenableModel` over the bridge's HF model (`model.original_model`) with a
      `LowRankRotatedSpaceIntervention`; it runs base and source forwards every step, as pyvene does
      (given the attention mask and mask-derived positions of the left-padded batches).

Preparation (`prep_s`, and `prep_s_per_batch`) is `prepare(...)` over all batches: one base and
one source run per batch without gradients (the sources that are their base prompt, half of
the paper's train pairs, take the base run's activations), and the runtime guard on batch 0.
pyvene prepares nothing (its row's `prep_s` is building the `IntervenableModel`): it runs both
forwards at every step, inside its epoch time.

Before timing, the patched END logits of one batch are compared: kernel and cache vs plain (<= 1e-4) and
pyvene vs ours (<= 1e-3) with the same basis, copied into pyvene's rotate layer. pyvene's
convention is ours: its rotate-layer weight W is d×k with orthonormal columns (torch's orthogonal
parametrization) and the patch is base + (source W − base W) Wᵀ, i.e. our basis V = W.

FLOP count of the fast path (multiply-add = 2 FLOP; norms, softmax, rotary, biases ignored), per
END token of a prompt with S tokens (prefix + END), site (kind, layer L), d = d_model,
m = d_mlp, h = n_heads, g = n_kv_heads, e = d_head, V = d_vocab, k = subspace dim:

    F_patch = 4 m k                        (x + ((s - x) V) Vᵀ; d instead of m for width-d sites)
    F_site  = 2 m d                        (mlp_post only: W_out of block L)
    F_block = 2 d (h e + 2 g e)            q, k, v projections
            + 4 h e S                      scores and weighted values over the S keys
            + 2 h e d                      W_O
            + 2 d m (3 if gated else 2)    MLP matmuls
    F_unemb = 2 d V
    F_fwd   = F_patch + F_site + (#blocks above the site) F_block + F_unemb

Backward: every weight is frozen and the prefix keys/values are constants, so autograd only
computes input gradients — one matmul per forward matmul. Training ≈ 2 × F_fwd per END token
(the usual "3× forward" counts weight gradients too, which DAS does not need; with 3× the rates
below would be 1.5× higher). An epoch's count sums 2 F_fwd over all training pairs. The
column `check_flops_analytic_over_counted` compares it with torch's FlopCounterMode on one
training step of batch 0 (forward + backward).

The reference rate is plain `torch.matmul` of the same shapes: [B, d] x [d, V] (unembedding),
[B, d] x [d, m] and [B, m] x [m, d] (MLP) at the DAS batch size B, and the FLOP-weighted mix of
all the projection and unembedding matmuls of one fast-path epoch's forwards (real batch sizes:
the last batch may be smaller than B).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from mlpim.config import compose
from mlpim.engine.family import family_of
from mlpim.engine.fastpath import MLP_SITES, first_block
from mlpim.engine.interventions import Prepared, patched_end_logits, patched_end_loss, prepare
from mlpim.engine.subspace import RotatedSubspace
from mlpim.errors import MlpimError
from mlpim.experiments.common import model_for, seed_everything, site_of
from mlpim.tasks.ioi import paper_pairs

DEFAULT_OUT = Path("outputs/bench/bench_das.csv")
FAST_TOL, PYVENE_TOL = 1e-4, 1e-3
MIX = "matmul fast-path mix (epoch shapes, FLOP-weighted)"


# --------------------------------------------------------------------------- arguments
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=1, help="epochs timed per path (at least)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: as is)"
    )
    p.add_argument(
        "--plain-batches",
        type=int,
        default=None,
        help="time only N batches of the plain path and extrapolate to an epoch",
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per path")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="keep timing whole epochs of a path until this much time has passed",
    )
    p.add_argument("--skip-pyvene", action="store_true", help="leave out path (c)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV of the table")
    return p.parse_known_args(argv)


# --------------------------------------------------------------------------- training steps
def our_step(model, rot: RotatedSubspace, opt) -> Callable[[Prepared], None]:
    """One `train_das` step (forward, CE at END, backward, Adam) on a prepared batch."""

    def step(p: Prepared) -> None:
        loss = patched_end_loss(model, p, rot)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    return step


def time_path(
    step,
    items: list,
    cost: list[float],
    epochs: int,
    warmup: int,
    min_s: float,
    seed: int,
    max_batches: int | None = None,
) -> tuple[float, int, int]:
    """Seconds per epoch, epochs and batches timed, over `items` in `train_das`'s shuffled order.

    With `max_batches`, only that many batches of one epoch run and the time is extrapolated to
    the epoch in proportion to `cost` (tokens per batch: batches differ in size and length).
    """
    gen = torch.Generator().manual_seed(seed)
    for i in range(warmup):
        step(items[i % len(items)])
    timed_cost, n_batches, elapsed, done = 0.0, 0, 0.0, 0
    while done < epochs or elapsed < min_s:
        order = torch.randperm(len(items), generator=gen).tolist()[:max_batches]
        start = time.perf_counter()
        for i in order:
            step(items[i])
        elapsed += time.perf_counter() - start
        timed_cost += sum(cost[i] for i in order)
        n_batches, done = n_batches + len(order), done + 1
        if max_batches is not None:
            break  # a partial epoch is extrapolated, never repeated
    return elapsed / timed_cost * sum(cost), done, n_batches


# --------------------------------------------------------------------------- pyvene
def pyvene_component(model, kind: str, layer: int) -> str:
    """pyvene component for a site of a llama/gpt2 HF model, equal to the TransformerLens hook.

    pyvene's llama map has no component for `blocks.L.mlp.hook_post` (the input to down_proj):
    `mlp_activation` is act_fn(gate) without the `* up` factor and `mlp_input` is the MLP's
    d_model-wide input. So mlp_post uses the module path of down_proj (c_proj in GPT-2).
    """
    hf = model.original_model
    prefix = "model.layers" if hasattr(hf, "model") else "transformer.h"
    out_proj = "down_proj" if hasattr(hf, "model") else "c_proj"
    named = {
        "resid_pre": "block_input",
        "resid_post": "block_output",
        "mlp_out": "mlp_output",
        "attn_out": "attention_output",
    }
    if kind == "mlp_post":
        return f"{prefix}[{layer}].mlp.{out_proj}.input"
    if kind in named:
        return named[kind]
    raise ValueError(f"no pyvene component for site kind {kind!r}")


def build_pyvene(model, kind: str, layer: int, basis: torch.Tensor):
    """IntervenableModel with a LowRankRotatedSpaceIntervention at the site, basis copied in."""
    import pyvene as pv

    hf = model.original_model
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    iv = pv.LowRankRotatedSpaceIntervention(
        embed_dim=basis.shape[0], low_rank_dimension=basis.shape[1]
    )
    set_basis(iv, basis)
    rep = {
        "layer": layer,
        "component": pyvene_component(model, kind, layer),
        "unit": "pos",
        "max_number_of_units": 1,
        "intervention": iv,
    }
    ivm = pv.IntervenableModel(pv.IntervenableConfig(representations=[rep]), hf)
    ivm.disable_model_gradients()
    return ivm, iv


def set_basis(iv, basis: torch.Tensor) -> None:
    """Copy a d×k orthonormal basis into pyvene's (orthogonally parametrized) rotate layer."""
    with torch.no_grad():
        iv.rotate_layer.weight = basis.detach().clone()
    got = iv.rotate_layer.weight.detach()
    proj = lambda v: v @ v.T  # noqa: E731
    assert torch.allclose(proj(got), proj(basis), atol=1e-5), "pyvene basis copy lost the subspace"


def hf_inputs(batch) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and mask-derived position_ids of a left-padded batch."""
    pos = (batch.mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch.tokens, "attention_mask": batch.mask, "position_ids": pos}


def pyvene_logits(ivm, pb) -> torch.Tensor:
    """pyvene's patched END logits of the base prompts (END position for base and source)."""
    b, end = len(pb), pb.base.end
    loc = [[[end]] * b]  # [intervention][example][unit]
    _, out = ivm(
        hf_inputs(pb.base), [hf_inputs(pb.source)], unit_locations={"sources->base": (loc, loc)}
    )
    return out.logits[:, -1]


def pyvene_step(ivm, opt) -> Callable:
    def step(pb) -> None:
        loss = torch.nn.functional.cross_entropy(pyvene_logits(ivm, pb), pb.label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    return step


# --------------------------------------------------------------------------- checks
def check_equivalence(model, first: dict[str, Prepared], k: int, ivm) -> dict[str, float]:
    """Patched END logits of batch 0: every engine == plain (1e-4), pyvene == ours (1e-3).

    `first`: each engine's prepared batch 0 (`full` is the plain path). The basis is the
    normalised mean (source − base) site difference (plus random columns when k > 1), and each
    disagreement must also be under a tenth of the patch's own effect on the logits, so a patch
    that misses its site cannot pass.
    """
    plain0 = first["full"]
    diff = (plain0.source_act - plain0.base_act).mean(0)[:, None]
    extra = torch.randn(diff.shape[0], k - 1, generator=torch.Generator().manual_seed(1))
    basis = torch.linalg.qr(torch.cat([diff.float().cpu(), extra], 1))[0]
    rot = RotatedSubspace(basis.shape[0], k)
    with torch.no_grad():
        rot.lin.weight = basis
        logits = {e: patched_end_logits(model, p, rot) for e, p in first.items()}
    plain = logits["full"]
    res = {"patch_effect": (plain - plain0.clean_logits).abs().max().item()}
    effect = res["patch_effect"]  # a disagreement must also be small next to the patch itself
    for engine in (e for e in logits if e != "full"):
        res[f"{engine}_vs_plain"] = (logits[engine] - plain).abs().max().item()
        ok = res[f"{engine}_vs_plain"] <= min(FAST_TOL, effect / 10)
        assert ok, f"{engine} and plain disagree: {res}"
    if ivm is not None:
        iv = next(iter(ivm.interventions.values()))
        set_basis(iv, rot.basis.detach())
        with torch.no_grad():
            pv_logits = pyvene_logits(ivm, plain0.pairs)
        res["pyvene_vs_plain"] = (pv_logits - plain).abs().max().item()
        ok = res["pyvene_vs_plain"] <= min(PYVENE_TOL, effect / 10)
        assert ok, f"pyvene disagrees with our patch: {res}"
    return res


# --------------------------------------------------------------------------- FLOPs
def end_token_flops(model, kind: str, layer: int, seq: int, k: int) -> float:
    """Forward FLOPs of the fast path for one END token (formula in the module docstring)."""
    c = model.cfg
    d, m, e = c.d_model, c.d_mlp, c.d_head
    h = c.n_heads
    g = getattr(c, "n_key_value_heads", None) or h
    gated = 3 if hasattr(model.blocks[layer].mlp, "gate") else 2
    width = m if kind == "mlp_post" else d
    f = 4 * width * k + (2 * m * d if kind == "mlp_post" else 0)
    if kind not in MLP_SITES + ("resid_pre", "resid_post"):
        raise ValueError(f"FLOP count covers mlp/resid sites, not {kind!r}")
    block = 2 * d * (h * e + 2 * g * e) + 4 * h * e * seq + 2 * h * e * d + 2 * d * m * gated
    return f + (c.n_layers - first_block(kind, layer)) * block + 2 * d * c.d_vocab


def epoch_flops(model, prepared: list[Prepared], kind: str, layer: int, k: int) -> float:
    """Training FLOPs of one fast-path epoch: 2 × forward per END token (frozen weights)."""
    return sum(
        2 * end_token_flops(model, kind, layer, int(n), k)
        for p in prepared
        for n in p.pairs.base.mask.sum(1)
    )


def counted_flops(model, p: Prepared, kind: str, layer: int, k: int) -> float:
    """FLOPs torch's FlopCounterMode sees in one fast-path training step (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    rot = RotatedSubspace(p.base_act.shape[-1], k).to(p.base_act.device)
    with FlopCounterMode(display=False) as counter:
        patched_end_loss(model, p, rot).backward()
    return float(counter.get_total_flops())


def matmul_rate(shapes: list[tuple[int, int, int, int]], like, min_s: float = 0.5) -> float:
    """GFLOP/s of plain torch.matmul over [(B, n_in, n_out, repeats)], FLOP-weighted, in the
    dtype and on the device of tensor `like` (the model's weights)."""
    new = lambda *shape: torch.randn(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
    ops = [(new(b, i), new(i, o), r) for b, i, o, r in shapes]
    flops = sum(2 * x.shape[0] * x.shape[1] * w.shape[1] * r for x, w, r in ops)

    def once() -> None:
        for x, w, r in ops:
            for _ in range(r):
                torch.matmul(x, w)

    sync = torch.cuda.synchronize if like.is_cuda else lambda: None
    once()
    sync()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or n < 3:
        once()
        sync()
        n += 1
    return flops * n / elapsed / 1e9


def matmul_refs(model, kind: str, layer: int, batch: int, sizes: list[int]) -> dict[str, float]:
    """Plain-matmul GFLOP/s: unembedding and MLP shapes at the DAS batch size, and the mix of
    every projection matmul a fast-path forward over one epoch runs (the real batch sizes)."""
    c = model.cfg
    d, m, e, h = c.d_model, c.d_mlp, c.d_head, c.n_heads
    g = getattr(c, "n_key_value_heads", None) or h
    gated = 2 if hasattr(model.blocks[layer].mlp, "gate") else 1
    blocks = c.n_layers - first_block(kind, layer)
    down = blocks + (kind == "mlp_post")
    mix = [
        shape
        for b in sizes
        for shape in [
            (b, d, h * e, blocks),
            (b, d, g * e, 2 * blocks),
            (b, h * e, d, blocks),
            (b, d, m, gated * blocks),
            (b, m, d, down),
            (b, d, c.d_vocab, 1),
        ]
    ]
    return {
        f"matmul unembed [{batch},{d}]x[{d},{c.d_vocab}]": matmul_rate(
            [(batch, d, c.d_vocab, 1)], model.W_U
        ),
        f"matmul mlp in [{batch},{d}]x[{d},{m}]": matmul_rate([(batch, d, m, 1)], model.W_U),
        f"matmul mlp out [{batch},{m}]x[{m},{d}]": matmul_rate([(batch, m, d, 1)], model.W_U),
        MIX: matmul_rate(mix, model.W_U),
    }


# --------------------------------------------------------------------------- main
PATHS = {  # engine -> row label
    "kernel": "kernel (END-only, fused unembedding + CE)",
    "cache": "cache (the model's own KV cache)",
    "full": "plain (full forward)",
}


def prepare_all(model, batches, kind: str, layer: int) -> tuple[dict, dict, str | None]:
    """Each engine's prepared batches and preparation seconds (guard included); the kernel is
    left out, with the reason, where it does not apply."""
    why = family_of(model).kernel_refusal
    prepared, seconds = {}, {}
    for engine in PATHS:
        if engine == "kernel" and why:
            continue
        start = time.perf_counter()
        prepared[engine] = prepare(model, batches, kind, layer, engine)
        seconds[engine] = time.perf_counter() - start
        print(
            f"prepare {engine}: {seconds[engine]:.2f} s "
            f"({seconds[engine] / len(batches):.3f} s per batch)"
        )
    return prepared, seconds, why


def setup_pyvene(model, kind: str, layer: int, d: int, k: int) -> tuple[object, float, str | None]:
    """(IntervenableModel or None, seconds to build it, why it cannot run)."""
    try:
        start = time.perf_counter()
        ivm, _ = build_pyvene(model, kind, layer, torch.linalg.qr(torch.randn(d, k))[0])
        return ivm, time.perf_counter() - start, None
    except Exception as exc:  # report why pyvene cannot run, time the rest
        print(f"pyvene cannot be set up: {type(exc).__name__}: {exc}")
        return None, float("nan"), f"{type(exc).__name__}: {exc}"


def time_all(model, cfg, args, prepared: dict, ivm, tokens: list[float]) -> dict[str, tuple]:
    """(s per epoch, what was timed) per path, each from the same initial basis."""
    d, k = prepared["full"][0].base_act.shape[-1], int(cfg.method.dim)
    init = RotatedSubspace(d, k, generator=torch.Generator().manual_seed(cfg.seed)).basis.detach()
    out = {}
    for engine, items in prepared.items():
        rot = RotatedSubspace(d, k)
        with torch.no_grad():
            rot.lin.weight = init
        rot = rot.to(items[0].base_act.device)
        opt = torch.optim.Adam(rot.parameters(), lr=cfg.method.lr)
        partial = args.plain_batches if engine == "full" else None
        s, ep, nb = time_path(
            our_step(model, rot, opt),
            items,
            tokens,
            args.epochs,
            args.warmup,
            args.min_seconds,
            cfg.seed,
            partial,
        )
        out[engine] = (s, f"{ep} epoch(s)" if partial is None else f"{nb} batches, extrapolated")
        print(f"{engine}: {s:.3f} s/epoch")
    if ivm is not None:
        set_basis(next(iter(ivm.interventions.values())), init)
        opt = torch.optim.Adam(ivm.get_trainable_parameters(), lr=cfg.method.lr)
        pairs = [p.pairs for p in prepared["full"]]
        s, ep, _ = time_path(
            pyvene_step(ivm, opt),
            pairs,
            tokens,
            args.epochs,
            args.warmup,
            args.min_seconds,
            cfg.seed,
        )
        out["pyvene"] = (s, f"{ep} epoch(s)")
        print(f"pyvene: {s:.3f} s/epoch")
    return out


def build_table(timed: dict, prep: dict, n_batches: int, why_kernel, why_pyvene) -> pd.DataFrame:
    """One row per path: s/epoch, preparation s (in all and per batch), ratios."""
    rows = []
    if why_kernel:
        rows.append({"path": PATHS["kernel"], "timed": f"not applicable: {why_kernel}"})
    for engine, label in [*PATHS.items(), ("pyvene", "pyvene 0.1.8")]:
        if engine in timed:
            s, what = timed[engine]
            rows.append(
                {
                    "path": label,
                    "s_per_epoch": s,
                    "prep_s": prep.get(engine, float("nan")),
                    "timed": what,
                }
            )
    if "pyvene" not in timed:
        rows.append({"path": "pyvene 0.1.8", "timed": f"not run: {why_pyvene or 'skipped'}"})
    table = pd.DataFrame(rows)
    table["prep_s_per_batch"] = table["prep_s"] / n_batches
    # pyvene prepares nothing (its prep_s is building the IntervenableModel): both forwards run
    # at every step, inside its epoch time
    table.loc[table.path == "pyvene 0.1.8", "prep_s_per_batch"] = float("nan")
    pv = timed.get("pyvene", (float("nan"),))[0]
    table["pyvene_over_path"] = pv / table["s_per_epoch"]
    first = table["s_per_epoch"].dropna().iloc[0]
    table["ratio_vs_first"] = table["s_per_epoch"] / first
    return table


def add_flops(
    table: pd.DataFrame, model, prepared: dict, kind: str, layer: int, k: int, bs: int, batches
) -> tuple[dict, dict]:
    """GFLOP/epoch and GFLOP/s of the kernel row (when the kernel runs) and the matmul refs."""
    table["gflop_per_epoch"] = float("nan")
    if "kernel" not in prepared:
        return {}, {}
    fast = prepared["kernel"]
    refs = matmul_refs(model, kind, layer, bs, [len(b) for b in batches])
    row = table.index[table.path == PATHS["kernel"]][0]
    table.loc[row, "gflop_per_epoch"] = epoch_flops(model, fast, kind, layer, k) / 1e9
    counted = counted_flops(model, fast[0], kind, layer, k)
    checks = {"flops_analytic_over_counted": epoch_flops(model, fast[:1], kind, layer, k) / counted}
    return refs, checks


def print_table(table: pd.DataFrame, refs: dict) -> None:
    cols = [
        "path",
        "s_per_epoch",
        "prep_s_per_batch",
        "pyvene_over_path",
        "ratio_vs_first",
        "gflop_per_s",
        "timed",
    ]
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60
    ):
        print()
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if refs:
        mix, rate = refs[MIX], table["gflop_per_s"].dropna().iloc[0]
        print(
            f"\nkernel reaches {rate:.2f} GFLOP/s (2× forward FLOPs, frozen weights); plain "
            f"matmul of the same shapes {mix:.2f} GFLOP/s ({mix / rate:.2f}× from it)."
        )


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(["device=cpu", *overrides])
    if cfg.site.layer is None and cfg.model.signal_peak is not None:  # no landmarks (Gemma 3)
        print(
            f"{cfg.model.name} has no landmarks; timing layer {cfg.model.signal_peak} (signal_peak)"
        )
        cfg = compose(["device=cpu", *overrides, f"site.layer={cfg.model.signal_peak}"])
    seed_everything(cfg.seed)
    model = model_for(cfg)
    try:
        kind, layer = site_of(cfg, model)
    except MlpimError as e:
        sys.exit(f"bench: error: {e}")
    k, bs = int(cfg.method.dim), cfg.dataset.batch_size
    batches = paper_pairs(model.tokenizer, cfg.dataset, "train", cfg.seed)
    batches = [b.to(model.cfg.device) for b in batches]
    print(
        f"model {cfg.model.name}, site {kind} L{layer}, k={k}, {len(batches)} left-padded "
        f"batches ({sum(len(b) for b in batches)} pairs, batch size <= {bs}), "
        f"threads {torch.get_num_threads()}, device {model.cfg.device}, {model.W_U.dtype}"
    )
    prepared, prep_s, why_kernel = prepare_all(model, batches, kind, layer)
    d = prepared["full"][0].base_act.shape[-1]
    ivm, prep_s["pyvene"], why_pyvene = (
        (None, float("nan"), "skipped")
        if args.skip_pyvene
        else setup_pyvene(model, kind, layer, d, k)
    )
    checks = check_equivalence(model, {e: p[0] for e, p in prepared.items()}, k, ivm)
    print(
        "equivalence (max |Δ logit| on batch 0): "
        + ", ".join(f"{n} {v:.2e}" for n, v in checks.items())
    )
    tokens = [float(p.base.mask.sum()) for p in batches]  # cost proxy to extrapolate
    timed = time_all(model, cfg, args, prepared, ivm, tokens)
    table = build_table(timed, prep_s, len(batches), why_kernel, why_pyvene)
    refs, more = add_flops(table, model, prepared, kind, layer, k, bs, batches)
    table["gflop_per_s"] = table["gflop_per_epoch"] / table["s_per_epoch"]
    refs_df = pd.DataFrame(
        [{"path": n, "gflop_per_s": r, "timed": "plain torch.matmul"} for n, r in refs.items()]
    )
    table = pd.concat([table, refs_df], ignore_index=True)
    for name, value in {**checks, **more}.items():
        table[f"check_{name}"] = value
    table["model"], table["site"], table["layer"], table["k"] = cfg.model.name, kind, layer, k
    table["batch_size"], table["threads"] = bs, torch.get_num_threads()
    table["device"], table["dtype"] = str(model.cfg.device), str(model.W_U.dtype)
    table["n_batches"] = len(batches)
    print_table(table, refs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"written: {args.out}")
    return table


if __name__ == "__main__":
    main()
