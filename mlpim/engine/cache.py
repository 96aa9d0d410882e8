"""The generic engine: resume the model's own forward from its own KV cache.

The base prompts run once up to the first patch column; their Hugging Face key/value cache is
kept. Each patched evaluation runs only the columns from there to END against that cache, with
the site patched at each prompt's own position by a hook. Every architectural detail (rotary
variants, sliding windows, QK norms, parallel blocks, biases ...) is the model's own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlpim.engine.patching import Setter, patch_hook
from mlpim.tasks.batch import PromptBatch


@dataclass
class CacheState:
    """The base run's cache of columns [0, start) and the columns it resumes from `start`."""

    start: int
    past: Any  # transformers Cache of the prefix (never mutated: `fork`ed per call); None if empty
    tokens: Int[Tensor, "b n"]  # columns start..END
    mask: Int[Tensor, "b seq"]  # the whole batch's attention mask
    pos: Int[Tensor, " b"]  # patch column of each row, relative to `start`


def fork(past):
    """A shallow copy of a transformers cache: updates replace its tensors, never mutate them."""
    if past is None:
        return None
    new = copy.copy(past)
    new.layers = [copy.copy(layer) for layer in past.layers]
    return new


def cache_state(model, batch: PromptBatch) -> CacheState:
    """Run the base prompts up to their first patch column and keep the model's cache."""
    start = int(batch.pos.min())
    past = None
    if start > 0:
        with torch.no_grad():
            _, past = model(
                batch.tokens[:, :start], attention_mask=batch.mask[:, :start],
                return_type="logits_and_cache",
            )  # fmt: skip
    return CacheState(start, past, batch.tokens[:, start:], batch.mask, batch.pos - start)


def resume(
    model, state: CacheState, name: str, setter: Setter, source: Float[Tensor, "b ..."]
) -> Float[Tensor, "b vocab"]:
    """END logits with hook `name` patched by `setter` at each row's position."""
    hook = patch_hook(setter, source, state.pos)
    kwargs = {"attention_mask": state.mask}
    if state.past is not None:
        kwargs["past_key_values"] = fork(state.past)
    logits = model.run_with_hooks(state.tokens, fwd_hooks=[(name, hook)], **kwargs)
    return logits[:, -1]
