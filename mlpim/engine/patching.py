"""Generic activation patching: one core function and small site setters.

A setter maps (base activation, source activation) at a hook, at each prompt's patch position,
to the patched activation. The core runs the base prompts with hooks replaced, as in
TransformerLens's `patching.py`. Prompts are left-padded `PromptBatch`es (END = last column);
every forward passes their attention mask, so the model derives positions itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlpim.engine.batch import PromptBatch

Setter = Callable[[Tensor, Tensor], Tensor]  # (base_at_pos, source_at_pos) -> patched_at_pos


def full(base: Float[Tensor, "b ..."], source: Float[Tensor, "b ..."]) -> Float[Tensor, "b ..."]:
    """Replace the whole component."""
    return source


def head(index: int) -> Setter:
    """Replace one head of a `hook_z`-like activation [b, heads, d_head]."""

    def set_head(base: Float[Tensor, "b h d"], source: Float[Tensor, "b h d"]) -> Tensor:
        out = base.clone()
        out[:, index] = source[:, index]
        return out

    return set_head


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype directions are kept and patches computed in next to `x`: x's own, at least
    float32 (the directions of a bfloat16 or float16 model stay float32)."""
    return torch.promote_types(x.dtype, torch.float32)


def subspace_patch(
    base: Float[Tensor, "b d"], source: Float[Tensor, "b d"], basis: Float[Tensor, "d k"]
) -> Float[Tensor, "b d"]:
    """x' = x_base + (x_source - x_base) V Vᵀ for a basis V with orthonormal columns; computed
    in the wider of the two dtypes (a float32 basis in a bfloat16 model), returned in base's,
    on base's device (the site's layer's, where a model is split across devices)."""
    basis = basis.to(base.device)
    dtype = torch.promote_types(base.dtype, basis.dtype)
    if dtype == base.dtype == basis.dtype:
        return base + ((source - base) @ basis) @ basis.T
    b, v = base.to(dtype), basis.to(dtype)
    return (b + ((source.to(dtype) - b) @ v) @ v.T).to(base.dtype)


def subspace(basis: Float[Tensor, "d k"]) -> Setter:
    """Patch along the span of `basis` (orthonormal columns)."""
    return lambda base, source: subspace_patch(base, source, basis)


def at(x: Float[Tensor, "b seq ..."], pos: Int[Tensor, " b"]) -> Float[Tensor, "b ..."]:
    """Each row's activation at its own column `pos`."""
    return x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)]


def put(x: Tensor, pos: Int[Tensor, " b"], value: Tensor) -> Tensor:
    """A copy of x with each row's column `pos` set to `value` (differentiable)."""
    out = x.clone()
    out[torch.arange(x.shape[0], device=x.device), pos.to(x.device)] = value.to(x.device, x.dtype)
    return out


def logits_end(model, batch: PromptBatch) -> Float[Tensor, "b vocab"]:
    """The model's own END logits of a batch."""
    return model(batch.tokens, attention_mask=batch.mask)[:, -1]


def cached_run(model, batch: PromptBatch, names, **kwargs) -> tuple:
    """(output, activation cache of `names`) of one forward without gradients; `kwargs` go to
    the model (e.g. `logits_to_keep`, `stop_at_layer`, `return_type`)."""
    names = set(names)
    with torch.no_grad():
        return model.run_with_cache(
            batch.tokens, attention_mask=batch.mask, names_filter=lambda n: n in names, **kwargs
        )


def run_cache(model, batch: PromptBatch, names) -> tuple[Float[Tensor, "b vocab"], dict]:
    """(END logits, activation cache of `names`) of one full forward (no gradients). The model
    computes its logits at END only (transformers' `logits_to_keep=1`; tests/test_engine.py)."""
    logits, cache = cached_run(model, batch, names, logits_to_keep=1)
    return logits[:, -1].clone(), cache  # a copy: a view would keep the whole logits tensor


def last_block(names) -> int | None:
    """The highest block index among hook names `blocks.L.*`; None if one is outside blocks."""
    layers = [n.split(".")[1] for n in names if n.startswith("blocks.")]
    if len(layers) != len(names) or not all(x.isdigit() for x in layers):
        return None
    return max(int(x) for x in layers)


def length_groups(mask: Int[Tensor, "b seq"], saving: float = 0.1) -> list[Int[Tensor, " n"]]:
    """Row indices in one group, or in two of similar real length where padding each only to its
    own longest row saves at least `saving` of the batch's padded columns."""
    lengths = mask.sum(1)
    order = lengths.argsort(stable=True)
    ls, n = lengths[order].tolist(), len(lengths)
    splits = [(k * ls[k - 1] + (n - k) * ls[-1], k) for k in range(1, n)]
    cost, k = min(splits, default=(n * ls[-1], n))
    if cost > (1 - saving) * n * ls[-1]:
        return [torch.arange(n)]
    return [order[:k], order[k:]]


def select_rows(batch: PromptBatch, rows: Int[Tensor, " n"]) -> PromptBatch:
    """Rows `rows` of a left-padded batch, without the columns that are padding in all of them."""
    cut = batch.tokens.shape[1] - int(batch.mask[rows].sum(1).max())
    tokens, mask = batch.tokens[rows, cut:], batch.mask[rows, cut:]
    return PromptBatch(tokens, mask, batch.pos[rows] - cut, batch.answer[rows], batch.other[rows])


def site_acts(model, batch: PromptBatch, names: list[str]) -> dict[str, Float[Tensor, "b ..."]]:
    """Activations of `names` at each prompt's patch position. The rows run in groups of similar
    length (`length_groups`); each forward stops after the last block the names belong to
    (TransformerLens's `stop_at_layer`), else computes logits at END only."""
    last = last_block(names)
    early = last is not None and last + 1 < model.cfg.n_layers
    kwargs = {"stop_at_layer": last + 1} if early else {"logits_to_keep": 1}
    out: dict[str, Tensor] = {}
    for rows in length_groups(batch.mask):
        sub = select_rows(batch, rows)
        _, cache = cached_run(model, sub, names, **kwargs)
        for n in names:
            act = at(cache[n], sub.pos)
            whole = out.setdefault(n, act.new_empty(len(batch), *act.shape[1:]))
            whole[rows.to(act.device)] = act
    return out


def same_prompts(a: PromptBatch, b: PromptBatch) -> Bool[Tensor, " b"]:
    """Rows where `a` and `b` hold the same prompt patched at the same column from its END."""
    real = lambda x, i: x.tokens[i][x.mask[i].bool()]  # noqa: E731
    return torch.tensor(
        [
            a.end - int(a.pos[i]) == b.end - int(b.pos[i]) and torch.equal(real(a, i), real(b, i))
            for i in range(len(a))
        ],
        dtype=torch.bool,
    )


def source_acts(
    model, base: PromptBatch, source: PromptBatch, names: list[str], own: dict[str, Tensor]
) -> dict[str, Float[Tensor, "b ..."]]:
    """`site_acts` of the source prompts, where a row that is its base prompt (`same_prompts`)
    takes the base run's own activations `own` (name -> [b, ...]) instead of running again."""
    rest = (~same_prompts(base, source)).nonzero().squeeze(1)
    if len(rest) == len(source):
        return site_acts(model, source, names)
    out = {n: own[n].clone() for n in names}
    if len(rest):
        ran = site_acts(model, select_rows(source, rest), names)
        for n in names:
            out[n][rest] = ran[n]
    return out


def patch_hook(setter: Setter, source: Tensor, pos: Int[Tensor, " b"]):
    """A forward hook that patches each row's column `pos` with `setter(base, source)`."""

    def hook(act: Tensor, hook=None) -> Tensor:
        return put(act, pos, setter(at(act, pos), source))

    return hook


def patched_logits(
    model,
    base: PromptBatch,
    sources: Mapping[str, Float[Tensor, "b ..."]],
    setters: Mapping[str, Setter],
) -> Float[Tensor, "b vocab"]:
    """END logits of the base prompts with each hook set by its setter at the patch position."""
    hooks = [(n, patch_hook(s, sources[n], base.pos)) for n, s in setters.items()]
    return model.run_with_hooks(base.tokens, attention_mask=base.mask, fwd_hooks=hooks)[:, -1]
