"""The hand-written END-only kernel for GPT-2-, Llama- and Gemma-3-shaped blocks (an optimisation).

Attention is causal, so a patch at END leaves every earlier position unchanged. `end_state` runs
the base prompts once (no gradients) and keeps the prefix keys/values of every later block; then
`resume` runs a single token per prompt through the remaining blocks against that cache.
It re-implements attention (rotate-half rotary with each block's own cos/sin, the model's query
scale, QK norms, sliding windows, attention then MLP, with the blocks' post-norms where they
have them), so it only runs where the model's family has no `kernel_refusal` and the runtime
guard (`engine.prepare`) has checked its unpatched logits against the model's own; everything
else uses `engine.cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlpim.engine.batch import PromptBatch
from mlpim.engine.family import family_of, post_attn_norm, post_mlp_norm
from mlpim.engine.fused_ce import unembed_ce, unembed_ce_rows
from mlpim.engine.models import block_device, hook_name, module_device
from mlpim.engine.patching import run_cache

MLP_SITES = ("mlp_post", "mlp_out")
MID_SITES = ("resid_mid", "attn_out", "z")
KINDS = ("resid_pre", "resid_post", *MLP_SITES, *MID_SITES)


@dataclass
class EndState:
    """Unpatched base-prompt activations the END-only forward needs."""

    kind: str
    layer: int
    resid_pre: Float[Tensor, "b d"]  # at `layer`
    resid_mid: Float[Tensor, "b d"]  # at `layer`
    keys: dict[int, Float[Tensor, "b kv dh prefix"]]  # per block that runs; rotary applied;
    values: dict[int, Float[Tensor, "b kv prefix dh"]]  # laid out for `q @ keys`, `p @ values`
    rotary: dict[int, tuple[Tensor, Tensor]] | None  # per block: (cos, sin) at END, [b or 1, dh]
    key_mask: Bool[Tensor, "b prefix"]  # False on left padding


def query_divisor(model, d_head: int) -> float:
    """q·k is divided by this: sqrt(query_pre_attn_scalar) on Gemma, else sqrt(d_head)."""
    return math.sqrt(family_of(model).query_scalar or d_head)


def first_block(kind: str, layer: int) -> int:
    """Index of the first whole block the END token must run after a patch at (kind, layer)."""
    return layer if kind == "resid_pre" else layer + 1


def state_names(model, kind: str, layer: int) -> set[str]:
    """Hooks `state_from_cache` reads for a site (kind, layer)."""
    blocks, rotary = range(first_block(kind, layer), model.cfg.n_layers), family_of(model).rotary
    k_hook = "hook_rot_k" if rotary else "hook_k"
    names = {hook_name("resid_pre", layer), hook_name("resid_mid", layer)}
    for i in blocks:
        names |= {f"blocks.{i}.attn.{k_hook}", f"blocks.{i}.attn.hook_v"}
        if rotary:  # each block's own (Gemma 3: local and global rotary bases)
            names |= {f"blocks.{i}.attn.hook_cos", f"blocks.{i}.attn.hook_sin"}
    return names


def state_from_cache(model, cache, kind: str, layer: int, mask: Tensor) -> EndState:
    """EndState for a site from an activation cache of the base prompts holding `state_names`;
    `mask` is their attention mask (left padding)."""
    blocks, rotary = range(first_block(kind, layer), model.cfg.n_layers), family_of(model).rotary
    k_hook = "hook_rot_k" if rotary else "hook_k"
    rot = None
    if rotary:
        end = lambda i, x: cache[f"blocks.{i}.attn.hook_{x}"][:, -1]  # noqa: E731
        rot = {i: (end(i, "cos"), end(i, "sin")) for i in blocks}
    keep = mask[:, :-1].bool()

    def prefix(name: str, *order: int) -> Tensor:
        """[b, seq, kv, dh] prefix columns, permuted to `order`; padding gets weight 0, but
        0 * NaN is NaN: padded rows may hold anything, so they are zeroed."""
        x = cache[name][:, :-1]
        x = x.masked_fill(~keep.to(x.device)[:, :, None, None], 0.0)
        return x.permute(*order).contiguous()

    return EndState(
        kind,
        layer,
        cache[hook_name("resid_pre", layer)][:, -1],
        cache[hook_name("resid_mid", layer)][:, -1],
        {i: prefix(f"blocks.{i}.attn.{k_hook}", 0, 2, 3, 1) for i in blocks},
        {i: prefix(f"blocks.{i}.attn.hook_v", 0, 2, 1, 3) for i in blocks},
        rot,
        keep,
    )


def merge_states(parts: list[tuple[Tensor, EndState]], n: int, prefix: int) -> EndState:
    """One EndState for n rows from the states of row groups `(rows, state)` (one site); each
    group's prefix keys/values are left-padded to `prefix` columns as padding is: zeros, masked."""
    first = parts[0][1]

    def stack(get) -> Tensor:
        """Each group's tensor `get(state)` put at its rows of an n-row tensor."""
        out = get(first).new_zeros(n, *get(first).shape[1:])
        for rows, st in parts:
            out[rows.to(out.device)] = get(st)
        return out

    def left(x: Tensor, dim: int) -> Tensor:
        """x with zero columns before its own along `dim`, up to `prefix`."""
        pad = list(x.shape)
        pad[dim] = prefix - x.shape[dim]
        return torch.cat([x.new_zeros(pad), x], dim=dim)

    rows_of = lambda st: st.resid_pre.shape[0]  # noqa: E731
    rot = None
    if first.rotary is not None:  # per block, [b or 1, dh] per group

        def rows(i: int, j: int) -> Tensor:
            return stack(lambda st: st.rotary[i][j].expand(rows_of(st), -1))

        rot = {i: (rows(i, 0), rows(i, 1)) for i in first.rotary}
    keys = {i: stack(lambda st, i=i: left(st.keys[i], 3)) for i in first.keys}
    values = {i: stack(lambda st, i=i: left(st.values[i], 2)) for i in first.values}
    resid = [stack(lambda st, a=a: getattr(st, a)) for a in ("resid_pre", "resid_mid")]
    key_mask = stack(lambda st: left(st.key_mask, 1))
    return EndState(first.kind, first.layer, *resid, keys, values, rot, key_mask)


def repeat_rows(state: EndState, n: int) -> EndState:
    """The state with each row repeated n times in a row (row i·n + j is row i)."""
    rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731
    rot = None
    if state.rotary is not None:  # [b or 1, dh]: one row is shared by every row already
        rot = {i: tuple(t if len(t) == 1 else rep(t) for t in cs) for i, cs in state.rotary.items()}
    keys = {i: rep(k) for i, k in state.keys.items()}
    values = {i: rep(v) for i, v in state.values.items()}
    resid = rep(state.resid_pre), rep(state.resid_mid)
    return EndState(state.kind, state.layer, *resid, keys, values, rot, rep(state.key_mask))


def end_state(model, batch: PromptBatch, kind: str, layer: int) -> EndState:
    """Run the base prompts once and keep what `resume` needs for a site (kind, layer)."""
    _, cache = run_cache(model, batch, state_names(model, kind, layer))
    return state_from_cache(model, cache, kind, layer, batch.mask)


@dataclass(frozen=True)
class AttnWeights:
    """One block's attention weights as flat matrices: [d, heads*dh] in, [heads*dh, d] out;
    `qkv` is q, k and v side by side (one matmul when queries and keys read the same input)."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    bq: Tensor
    bk: Tensor
    bv: Tensor
    bo: Tensor
    n_heads: int
    n_kv: int
    qkv: Tensor
    bqkv: Tensor


def _flat_in(w: Tensor) -> Tensor:  # [h, d, dh] -> [d, h*dh]
    return w.permute(1, 0, 2).reshape(w.shape[1], -1).contiguous()


def _bias(attn, name: str, n: int, like: Tensor) -> Tensor:
    b = getattr(attn, name, None)
    return like.new_zeros(n) if b is None else b.reshape(-1)


def attn_weights(model, i: int) -> AttnWeights:
    """Block i's attention weights, flattened once and cached on the (frozen) model."""
    cache = model.__dict__.setdefault("_mlpim_attn_weights", {})
    if i not in cache:
        a = model.blocks[i].attn
        q, k, v = _flat_in(a.W_Q), _flat_in(a.W_K), _flat_in(a.W_V)
        o = a.W_O.reshape(-1, a.W_O.shape[-1]).contiguous()
        bq, bk = _bias(a, "b_Q", q.shape[1], q), _bias(a, "b_K", k.shape[1], k)
        bv, bo = _bias(a, "b_V", v.shape[1], v), _bias(a, "b_O", o.shape[1], o)
        cache[i] = AttnWeights(
            q=q,
            k=k,
            v=v,
            o=o,
            bq=bq,
            bk=bk,
            bv=bv,
            bo=bo,
            n_heads=a.W_Q.shape[0],
            n_kv=a.W_K.shape[0],
            qkv=torch.cat([q, k, v], 1),
            bqkv=torch.cat([bq, bk, bv]),
        )
    return cache[i]


def _rotate(x: Float[Tensor, "b h dh"], cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _qkv(model, i: int, xq: Tensor, xkv: Tensor | None, state: EndState) -> tuple:
    """END queries [b, h, dh] and END key, value [b, kv, dh] of block i; QK norms and rotary
    applied to q and k."""
    w = attn_weights(model, i)
    b, h, g = xq.shape[0], w.n_heads, w.n_kv
    if xkv is None:  # one matmul for q, k and v
        qkv = torch.addmm(w.bqkv, xq, w.qkv).view(b, h + 2 * g, -1)
    else:
        qkv = torch.cat(
            [
                (xq @ w.q + w.bq).view(b, h, -1),
                torch.addmm(w.bk, xkv, w.k).view(b, g, -1),
                torch.addmm(w.bv, xkv, w.v).view(b, g, -1),
            ],
            dim=1,
        )
    qk, v = qkv[:, : h + g], qkv[:, h + g :]
    attn = model.blocks[i].attn
    if family_of(model).qk_norm:  # Gemma 3's own per-head QK norms
        qk = torch.cat([attn.q_norm(qk[:, :h]), attn.k_norm(qk[:, h:])], dim=1)
    if state.rotary is not None:
        qk = _rotate(qk, *state.rotary[i])
    return qk[:, :h], qk[:, h:], v


def key_mask(model, i: int, state: EndState) -> Bool[Tensor, "b prefix"]:
    """Prefix keys END sees in block i: not padding, and within a sliding window's reach (keys
    less than the block's window columns before END, as the model's mask counts columns)."""
    w, keep = family_of(model).windows[i], state.key_mask
    if w is None or keep.shape[1] < w:
        return keep
    return keep & (torch.arange(keep.shape[1], device=keep.device) > keep.shape[1] - w)


def attn_end(
    model, i: int, xq: Float[Tensor, "b d"], state: EndState, xkv: Tensor | None = None
) -> Float[Tensor, "b h dh"]:
    """hook_z at END of block i for the END query from xq and END key/value from xkv (default
    xq; both already normalised), against the cached prefix. The END column's own score and
    value are handled apart from the prefix's, so the cached keys/values are never copied."""
    w = attn_weights(model, i)
    q, k, v = _qkv(model, i, xq, xkv, state)
    b, g = q.shape[0], w.n_kv
    q = q.view(b, g, w.n_heads // g, -1) / query_divisor(model, q.shape[-1])  # grouped by kv head
    scores = torch.cat([q @ state.keys[i], (q * k[:, :, None]).sum(-1, keepdim=True)], dim=-1)
    keep = torch.cat([key_mask(model, i, state), state.key_mask.new_ones(b, 1)], dim=1)
    keep = keep.to(scores.device)  # the batch's device; scores are on block i's
    p = scores.masked_fill(~keep[:, None, None], float("-inf")).softmax(-1)
    z = p[..., :-1] @ state.values[i] + p[..., -1:] * v[:, :, None]
    return z.reshape(b, w.n_heads, -1)


def _norm(module, x: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
    return module(x[:, None])[:, 0]


def _post_norm(module, x: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
    """x through a block's post-attention or post-feedforward norm where it has one (Gemma 3)."""
    return x if module is None else _norm(module, x)


def attn_pre_norm(model, i: int, z: Float[Tensor, "b h dh"]) -> Float[Tensor, "b d"]:
    """z @ W_O + b_O of block i: its attention output before any post-attention norm."""
    w = attn_weights(model, i)
    return z.reshape(z.shape[0], -1) @ w.o + w.bo


def attn_out_from_z(model, i: int, z: Float[Tensor, "b h dh"]) -> Float[Tensor, "b d"]:
    """Attention output of block i (hook_attn_out) from its per-head z."""
    return _post_norm(post_attn_norm(model, i), attn_pre_norm(model, i, z))


def mlp_out_from_post(model, i: int, post: Float[Tensor, "b m"]) -> Float[Tensor, "b d"]:
    """MLP output of block i (hook_mlp_out) from its hidden activations (the input to W_out)."""
    return _post_norm(post_mlp_norm(model, i), model.blocks[i].mlp.out(post))


def mlp_out(model, i: int, mid: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
    """Block i's MLP output (hook_mlp_out) for END residual `mid`."""
    blk = model.blocks[i]
    return _post_norm(post_mlp_norm(model, i), blk.mlp(blk.ln2(mid[:, None]))[:, 0])


def mlp_end(model, i: int, mid: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
    """Residual after block i's MLP, from its resid_mid."""
    return mid + mlp_out(model, i, mid)


def block_end(model, i: int, h: Float[Tensor, "b d"], state: EndState) -> Float[Tensor, "b d"]:
    """One whole block for the END token, on the block's device."""
    h = h.to(block_device(model, i))
    z = attn_end(model, i, _norm(model.blocks[i].ln1, h), state)
    return mlp_end(model, i, h + attn_out_from_z(model, i, z))


def resume_hidden(model, state: EndState, act: Tensor) -> Float[Tensor, "b d"]:
    """Final (normalised) END residual when the site's END activation is `act` (patched)."""
    kind, layer = state.kind, state.layer
    if kind in ("resid_pre", "resid_post"):
        h = act
    elif kind in MLP_SITES:
        out = mlp_out_from_post(model, layer, act) if kind == "mlp_post" else act
        h = state.resid_mid + out
    elif kind in MID_SITES:
        attn = attn_out_from_z(model, layer, act) if kind == "z" else act
        mid = act if kind == "resid_mid" else state.resid_pre + attn
        h = mlp_end(model, layer, mid)
    else:
        raise ValueError(f"fast path has no site kind {kind!r}")
    for i in range(first_block(kind, layer), model.cfg.n_layers):
        h = block_end(model, i, h, state)
    return _norm(model.ln_final, h.to(module_device(model.ln_final)))


def resume(model, state: EndState, act: Tensor) -> Float[Tensor, "b vocab"]:
    """END logits when the site's END activation is `act` (patched) and everything else is base."""
    h = resume_hidden(model, state, act)
    return model.unembed(h.to(module_device(model.unembed))[:, None])[:, 0]


def unembed_weights(model) -> tuple[Float[Tensor, "vocab d"], Float[Tensor, " vocab"]]:
    """(W_Uᵀ contiguous, b_U), built once and cached on the (frozen) model."""
    cache = model.__dict__
    if "_mlpim_unembed" not in cache:
        w_u = model.W_U.detach()
        b_u = getattr(model, "b_U", None)
        b_u = w_u.new_zeros(w_u.shape[1]) if b_u is None else b_u.detach()
        cache["_mlpim_unembed"] = (w_u.t().contiguous(), b_u)
    return cache["_mlpim_unembed"]


def resume_loss(model, state: EndState, act: Tensor, labels: Int[Tensor, " b"]) -> Tensor:
    """Mean cross-entropy over the vocabulary of the patched END logits.

    The unembedding is fused with the loss (`mlpim.engine.fused_ce`): equal to
    `cross_entropy(resume(...), labels)` and its gradient (tests/test_fastpath.py).
    """
    return unembed_ce(resume_hidden(model, state, act), *unembed_weights(model), labels)


def resume_losses(model, state: EndState, act: Tensor, labels: Int[Tensor, " b"]) -> Tensor:
    """Each row's cross-entropy over the vocabulary of the patched END logits (`resume_loss`
    per row)."""
    return unembed_ce_rows(resume_hidden(model, state, act), *unembed_weights(model), labels)
