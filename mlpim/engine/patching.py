"""Generic activation patching: one core function and small site setters.

A setter maps (base activation, source activation) at a hook, at each prompt's patch position,
to the patched activation. The core runs the base prompts with hooks replaced, as in
TransformerLens's `patching.py`. Prompts are left-padded `PromptBatch`es (END = last column);
every forward passes their attention mask, so the model derives positions itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlpim.tasks.batch import PromptBatch

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
    in the wider of the two dtypes (a float32 basis in a bfloat16 model), returned in base's."""
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
    return x[torch.arange(x.shape[0], device=x.device), pos]


def put(x: Tensor, pos: Int[Tensor, " b"], value: Tensor) -> Tensor:
    """A copy of x with each row's column `pos` set to `value` (differentiable)."""
    out = x.clone()
    out[torch.arange(x.shape[0], device=x.device), pos] = value.to(x.dtype)
    return out


def logits_end(model, batch: PromptBatch) -> Float[Tensor, "b vocab"]:
    """The model's own END logits of a batch."""
    return model(batch.tokens, attention_mask=batch.mask)[:, -1]


def run_cache(model, batch: PromptBatch, names) -> tuple[Float[Tensor, "b vocab"], dict]:
    """(END logits, activation cache of `names`) of one forward (no gradients)."""
    names = set(names)
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            batch.tokens, attention_mask=batch.mask, names_filter=lambda n: n in names
        )
    return logits[:, -1].clone(), cache  # a copy: a view would keep every position's logits


def site_acts(model, batch: PromptBatch, names: list[str]) -> dict[str, Float[Tensor, "b ..."]]:
    """Activations of `names` at each prompt's patch position."""
    _, cache = run_cache(model, batch, names)
    return {n: at(cache[n], batch.pos) for n in names}


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
