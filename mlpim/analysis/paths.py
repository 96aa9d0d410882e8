"""Path patching at the END token: how an intervention reaches the logits, head by head.

Everything here runs the END token only (see `fastpath`): a patch at END leaves every earlier
position unchanged, so a run is described by its END-token `EndTrace` (residual before each
block, per-head `hook_z`, MLP outputs, final residual) against the cached prefix keys/values.

Effects on the logit difference LD = logit(IO) - logit(S) of the base prompts:
- `output_effects`: one head's END output (or one MLP's) taken from the patched run, every other
  component's output frozen at its clean value (the direct path to the logits).
- `query_effects`: one head's END query computed from the patched run's residual, its END
  key/value and everything else from the clean run; the new head output then reaches the logits
  directly as above.
- `dla`: direct logit attribution, each head's output projected on W_U[:, IO] - W_U[:, S]
  through the final norm with its scale frozen at the run's own value.
With `frozen=True` the first two use the clean run's frozen final-norm scale too, which makes
them linear in the head outputs (they add up to the change of the final residual's DLA).
Where a block normalises its attention output before the residual (Gemma 3's ln1_post), a head's
output is what it adds before that norm, and the norm is recomputed (`head_deltas`); so per-head
effects are not additive there, and `dla` freezes that norm's scale at the run's own.

`run_trace` stops with one line unless the clean END trace gives the model's own END logits.

`path_patch` measures all of them for a list of `Intervention`s (and the whole source prompt,
`source_run`) over pair batches, as the tidy table ioi_path_patching writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mlpim.analysis.rows import metric_rows
from mlpim.engine import fastpath, metrics
from mlpim.engine.batch import PairBatch, PromptBatch
from mlpim.engine.family import family_of, is_rms, norm_gain, post_attn_norm
from mlpim.engine.interventions import EngineMismatchError, tolerance
from mlpim.engine.models import hook_name
from mlpim.engine.patching import Setter, run_cache

SOURCE = "source_run"  # the whole source prompt: the clean ABB vs BAB difference


@dataclass
class EndTrace:
    """END-token activations of one run from block `start` upward."""

    start: int
    resid_pre: dict[int, Float[Tensor, "b d"]]
    z: dict[int, Float[Tensor, "b h dh"]]
    mlp_out: dict[int, Float[Tensor, "b d"]]
    final: Float[Tensor, "b d"]  # residual after the last block, before the final norm

    def resid_mid(self, model, layer: int) -> Float[Tensor, "b d"]:
        """Residual between the attention and the MLP of `layer`."""
        return self.resid_pre[layer] + fastpath.attn_out_from_z(model, layer, self.z[layer])

    def resid_post(self, layer: int) -> Float[Tensor, "b d"]:
        """Residual after block `layer`."""
        return self.resid_pre[layer + 1] if layer + 1 in self.resid_pre else self.final


@dataclass
class Readout:
    """The LD readout of the base prompts: LD = norm(x) · u + c, with u, c per prompt."""

    u: Float[Tensor, "b d"]  # W_U[:, IO] - W_U[:, S]
    c: Float[Tensor, " b"]  # b_U[IO] - b_U[S]


def norm(module, x: Float[Tensor, "b ... d"]) -> Float[Tensor, "b ... d"]:
    """A TransformerBridge norm applied to END vectors (any leading shape)."""
    flat = x.reshape(-1, 1, x.shape[-1])
    return module(flat).reshape(x.shape)


def trace(model, state: fastpath.EndState, h: Float[Tensor, "b d"], start: int) -> EndTrace:
    """Run the END token from residual `h` before block `start` to the final residual."""
    pre, zs, outs = {}, {}, {}
    for i in range(start, model.cfg.n_layers):
        pre[i] = h
        zs[i] = fastpath.attn_end(model, i, norm(model.blocks[i].ln1, h), state)
        mid = h + fastpath.attn_out_from_z(model, i, zs[i])
        outs[i] = fastpath.mlp_out(model, i, mid)
        h = mid + outs[i]
    return EndTrace(start=start, resid_pre=pre, z=zs, mlp_out=outs, final=h)


def site_resid(model, clean: EndTrace, kind: str, layer: int, act: Tensor) -> Float[Tensor, "b d"]:
    """Residual after block `layer` when the END activation of site (kind, layer) is `act`."""
    if kind == "resid_post":
        return act
    if kind == "mlp_post":
        return clean.resid_mid(model, layer) + fastpath.mlp_out_from_post(model, layer, act)
    if kind == "mlp_out":
        return clean.resid_mid(model, layer) + act
    raise ValueError(f"path patching supports resid_post, mlp_post, mlp_out sites, not {kind!r}")


def patched_trace(
    model, state: fastpath.EndState, clean: EndTrace, kind: str, layer: int, act: Tensor
) -> EndTrace:
    """The END trace of the base prompts with site (kind, layer) set to `act` at END."""
    return trace(model, state, site_resid(model, clean, kind, layer, act), layer + 1)


def _head_writes(model, i: int, z: Float[Tensor, "b h dh"]) -> Float[Tensor, "b h d"]:
    """Each head's z times its W_O slice: what it adds before any post-attention norm."""
    w = fastpath.attn_weights(model, i)
    return torch.einsum("bhe,hed->bhd", z, w.o.view(w.n_heads, -1, w.o.shape[-1]))


def head_outputs(model, i: int, z: Float[Tensor, "b h dh"]) -> Float[Tensor, "b h d"]:
    """Each head's contribution to block i's attention output (b_O left out). Through a
    post-attention norm (an RMSNorm), its scale frozen at this z's own: they add up to the
    block's hook_attn_out less b_O's share."""
    writes, post = _head_writes(model, i, z), post_attn_norm(model, i)
    if post is None:
        return writes
    if not is_rms(post):
        raise ValueError("a frozen post-attention norm must be an RMSNorm")
    weight, scale = norm_scale(post, fastpath.attn_pre_norm(model, i, z))
    return writes * (weight / scale)[:, None]


def norm_scale(ln, x: Float[Tensor, "b d"]) -> tuple[Float[Tensor, " d"], Float[Tensor, "b 1"]]:
    """(weight, scale) of the bridge norm `ln` at input x: it computes weight * x' / scale, x'
    being x centred unless `ln` is an RMSNorm."""
    weight = norm_gain(ln)
    x = x if is_rms(ln) else x - x.mean(-1, keepdim=True)
    return weight, (x.pow(2).mean(-1, keepdim=True) + getattr(ln.config, "eps", 1e-5)).sqrt()


def head_deltas(
    model, i: int, z_new: Float[Tensor, "b h dh"], z_clean: Float[Tensor, "b h dh"]
) -> Float[Tensor, "b h d"]:
    """Per head: the change of block i's attention output (hook_attn_out) when that head's z
    alone is z_new's and the others stay clean; a post-attention norm is recomputed."""
    new, old = _head_writes(model, i, z_new), _head_writes(model, i, z_clean)
    post = post_attn_norm(model, i)
    if post is None:
        return new - old
    pre = fastpath.attn_pre_norm(model, i, z_clean)
    return norm(post, pre[:, None] + (new - old)) - norm(post, pre)[:, None]


def readout(model, io: Int[Tensor, " b"], s: Int[Tensor, " b"]) -> Readout:
    """Unembedding difference IO minus S per prompt."""
    w_u, b_u = model.unembed.W_U, model.unembed.b_U
    return Readout((w_u[:, io] - w_u[:, s]).T, b_u[io] - b_u[s])


def logit_diff(model, r: Readout, x: Float[Tensor, "b ... d"]) -> Float[Tensor, "b ..."]:
    """LD of final residuals x (the real final norm recomputed)."""
    y = norm(model.ln_final, x)
    u = r.u.view(r.u.shape[0], *[1] * (x.dim() - 2), -1)
    c = r.c.view(r.c.shape[0], *[1] * (x.dim() - 2))
    return (y * u).sum(-1) + c


def frozen_readout(model, r: Readout, final: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
    """Vector g with DLA(v) = v · g: the final norm's centering, weight and the scale of the run
    whose final residual is `final`, folded into the unembedding difference."""
    ln = model.ln_final
    weight, scale = norm_scale(ln, final)
    g = r.u * weight / scale
    return g if is_rms(ln) else g - g.mean(-1, keepdim=True)


def dla(out: Float[Tensor, "b ... d"], g: Float[Tensor, "b d"]) -> Float[Tensor, "b ..."]:
    """Direct effect on LD of component outputs `out` through the frozen readout g."""
    return (out * g.view(g.shape[0], *[1] * (out.dim() - 2), -1)).sum(-1)


def direct_effect(
    model, r: Readout, clean: EndTrace, delta: Float[Tensor, "b ... d"], frozen: bool
) -> Float[Tensor, "b ..."]:
    """Change of LD when `delta` is added to the clean final residual (and nothing else)."""
    if frozen:
        return dla(delta, frozen_readout(model, r, clean.final))
    base = logit_diff(model, r, clean.final)
    x = clean.final.view(clean.final.shape[0], *[1] * (delta.dim() - 2), -1) + delta
    return logit_diff(model, r, x) - base.view(base.shape[0], *[1] * (delta.dim() - 2))


def output_effects(
    model, r: Readout, clean: EndTrace, patched: EndTrace, frozen: bool = False
) -> dict[int, Float[Tensor, "b h"]]:
    """Per layer from `patched.start`: ΔLD when one head's END output alone is patched."""
    return {
        i: direct_effect(
            model,
            r,
            clean,
            head_deltas(model, i, patched.z[i], clean.z[i]),
            frozen,
        )
        for i in patched.z
    }


def mlp_effects(
    model, r: Readout, clean: EndTrace, patched: EndTrace, frozen: bool = False
) -> dict[int, Float[Tensor, " b"]]:
    """Per layer from `patched.start`: ΔLD when one MLP's END output alone is patched."""
    return {
        i: direct_effect(model, r, clean, patched.mlp_out[i] - clean.mlp_out[i], frozen)
        for i in patched.mlp_out
    }


def query_z(
    model, state: fastpath.EndState, clean: EndTrace, patched: EndTrace, i: int
) -> Float[Tensor, "b h dh"]:
    """Block i's END z when every head's query comes from the patched residual, the rest clean."""
    ln1 = model.blocks[i].ln1
    xq, xkv = norm(ln1, patched.resid_pre[i]), norm(ln1, clean.resid_pre[i])
    return fastpath.attn_end(model, i, xq, state, xkv)


def query_effects(
    model,
    state: fastpath.EndState,
    r: Readout,
    clean: EndTrace,
    patched: EndTrace,
    frozen: bool = False,
) -> dict[int, Float[Tensor, "b h"]]:
    """Per layer from `patched.start`: ΔLD when only one head's END query sees the patched run."""
    out = {}
    for i in patched.z:
        z = query_z(model, state, clean, patched, i)
        delta = head_deltas(model, i, z, clean.z[i])
        out[i] = direct_effect(model, r, clean, delta, frozen)
    return out


def head_dla(model, r: Readout, run: EndTrace) -> dict[int, Float[Tensor, "b h"]]:
    """Per layer from `run.start`: each head's DLA with the final-norm scale frozen from `run`."""
    g = frozen_readout(model, r, run.final)
    return {i: dla(head_outputs(model, i, run.z[i]), g) for i in run.z}


def trace_names(model, sites: list[tuple[str, int]]) -> set[str]:
    """Hooks one cached forward needs for `run_trace` and the END activations of `sites`."""
    return fastpath.state_names(model, "resid_pre", 0) | {hook_name(k, layer) for k, layer in sites}


def trace_logits(model, run: EndTrace) -> Float[Tensor, "b vocab"]:
    """END logits of a trace: its final residual through the model's final norm and unembedding."""
    return model.unembed(model.ln_final(run.final[:, None]))[:, 0]


def check_trace(model, run: EndTrace, logits: Float[Tensor, "b vocab"]) -> None:
    """Stop with one line unless the END trace's logits equal the model's own."""
    diff, tol = (trace_logits(model, run) - logits).abs().max().item(), tolerance(logits)
    if not diff <= tol:
        raise EngineMismatchError(
            f"path patching's END trace on {model.cfg.model_name!r} differs from the model's own "
            f"logits by max |Δ| = {diff:.3g} (tolerance {tol:.3g}): "
            f"{family_of(model).kernel_refusal or 'its blocks are not ones the trace reproduces'}"
        )


def run_trace(
    model, batch: PromptBatch, sites: list[tuple[str, int]]
) -> tuple[fastpath.EndState, EndTrace, dict[str, Tensor]]:
    """One forward of `batch`: the prefix state, the full END trace, the END site activations."""
    logits, cache = run_cache(model, batch, trace_names(model, sites))
    state = fastpath.state_from_cache(model, cache, "resid_pre", 0, batch.mask)
    with torch.no_grad():
        run = trace(model, state, state.resid_pre, 0)
        check_trace(model, run, logits)
    acts = {hook_name(k, layer): cache[hook_name(k, layer)][:, -1] for k, layer in sites}
    return state, run, acts


@dataclass(frozen=True)
class Intervention:
    """A patch of one END site: setter(base activation, source activation) -> patched."""

    name: str
    kind: str
    layer: int
    setter: Setter


def effects(model, state, r: Readout, clean: EndTrace, run: EndTrace, frozen: bool) -> dict:
    """{metric: {layer: per-prompt tensor}}: the path metrics of one patched (or source) run."""
    return {
        "ld_via_head_output": output_effects(model, r, clean, run, frozen),
        "ld_via_query": query_effects(model, state, r, clean, run, frozen),
        "dla": head_dla(model, r, run),
        "ld_via_mlp_output": mlp_effects(model, r, clean, run, frozen),
    }


def outcome(model, pb: PairBatch, r: Readout, run: EndTrace) -> dict[str, Tensor]:
    """Per-prompt LD and whether the argmax is the patched answer."""
    hit = (trace_logits(model, run).argmax(-1) == pb.label).float()
    return {"logit_diff": logit_diff(model, r, run.final), "hit": hit}


def path_patch_batch(model, pb: PairBatch, todo: list[Intervention], frozen: bool = False) -> dict:
    """{intervention: {metric: {layer: per-prompt tensor}} | outcome} for one pair batch."""
    sites = sorted({(iv.kind, iv.layer) for iv in todo})
    state, clean, base_acts = run_trace(model, pb.base, sites)
    _, source, src_acts = run_trace(model, pb.source, sites)
    r = readout(model, pb.base.io, pb.base.s)
    runs = {SOURCE: source}
    with torch.no_grad():
        for iv in todo:
            name = hook_name(iv.kind, iv.layer)
            act = iv.setter(base_acts[name], src_acts[name])
            runs[iv.name] = patched_trace(model, state, clean, iv.kind, iv.layer, act)
        out = {"clean": {"dla": head_dla(model, r, clean), **outcome(model, pb, r, clean)}}
        for name, run in runs.items():
            out[name] = effects(model, state, r, clean, run, frozen) | outcome(model, pb, r, run)
    return out


def concat(parts: list) -> Tensor | dict:
    """Concatenate per-batch results along the prompt axis (nested dicts keep their keys)."""
    if isinstance(parts[0], dict):
        return {k: concat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def intervention_rows(name: str, res: dict, clean_ld: Tensor) -> list[dict]:
    """Tidy rows of one intervention: per head, per MLP, and its overall LD / FLDD / IIA."""
    rows = []
    for metric, by_layer in res.items():
        if metric in ("logit_diff", "hit"):
            continue
        site = "mlp_out" if metric == "ld_via_mlp_output" else "z"
        for layer, t in by_layer.items():
            mean = t.mean(0).reshape(-1).tolist()
            heads = range(len(mean)) if site == "z" else [-1]
            keys = {"intervention": name, "site": site, "layer": layer}
            rows += [
                {**keys, "head": h, "metric": metric, "value": v}
                for h, v in zip(heads, mean, strict=True)
            ]
    ld = res["logit_diff"]
    overall = {
        "logit_diff": ld.mean().item(),
        "fldd": metrics.fldd(ld, clean_ld),
        "iia": res["hit"].mean().item(),
        "flip_rate": metrics.flip_rate(ld, clean_ld),
    }
    return rows + metric_rows(overall, intervention=name, site="logits", layer=-1, head=-1)


def path_patch(
    model, batches: list[PairBatch], todo: list[Intervention], frozen: bool = False
) -> pd.DataFrame:
    """Tidy table (mean over all pairs) of every intervention's path-patching metrics."""
    parts = [path_patch_batch(model, pb, todo, frozen) for pb in tqdm(batches, desc="path patch")]
    res = concat(parts)
    clean_ld = res["clean"]["logit_diff"]
    rows = [row for name, r in res.items() for row in intervention_rows(name, r, clean_ld)]
    return pd.DataFrame(rows)
