"""Generic activation patching at the END token: one core function and small site setters.

A setter maps (base activation, source activation) at a hook to the patched activation. The core
runs the base prompts with any number of hooks replaced, as in TransformerLens's `patching.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

Setter = Callable[[Tensor, Tensor], Tensor]  # (base_end, source_end) -> patched_end


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


def subspace_patch(
    base: Float[Tensor, "b d"], source: Float[Tensor, "b d"], basis: Float[Tensor, "d k"]
) -> Float[Tensor, "b d"]:
    """x' = x_base + (x_source - x_base) V Vᵀ for a basis V with orthonormal columns."""
    return base + ((source - base) @ basis) @ basis.T


def subspace(basis: Float[Tensor, "d k"]) -> Setter:
    """Patch along the span of `basis` (orthonormal columns)."""
    return lambda base, source: subspace_patch(base, source, basis)


def source_activations(
    model, tokens: Int[Tensor, "b seq"], names: list[str]
) -> dict[str, Float[Tensor, "b ..."]]:
    """END-token activations of `names` on the source prompts."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n][:, -1] for n in names}


def patched_logits(
    model,
    base_tokens: Int[Tensor, "b seq"],
    sources: Mapping[str, Float[Tensor, "b ..."]],
    setters: Mapping[str, Setter],
) -> Float[Tensor, "b vocab"]:
    """END logits of the base prompts with each hook's END activation set by its setter."""

    def make_hook(name: str, setter: Setter):
        def hook(act: Tensor, hook=None) -> Tensor:
            act = act.clone()
            act[:, -1] = setter(act[:, -1], sources[name])
            return act

        return hook

    hooks = [(name, make_hook(name, s)) for name, s in setters.items()]
    return model.run_with_hooks(base_tokens, fwd_hooks=hooks)[:, -1]
