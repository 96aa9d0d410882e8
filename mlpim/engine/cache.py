"""The generic engine: resume the model's own forward from its own KV cache.

The base prompts run once up to the first patch column; their Hugging Face key/value cache is
kept. Each patched evaluation runs only the columns from there to END against a deep copy of that
cache (the documented way to reuse a transformers cache: a call may update it in place), with the
site patched at each prompt's own position by a hook. Every architectural detail (rotary
variants, sliding windows, QK norms, parallel blocks, biases ...) is the model's own.

transformers >= 5.24 hands the cache to attention as `cache=`; TransformerLens 4.3's attention
bridges read it as `past_key_values=` and otherwise run without it. `_cache_kwarg` passes it under
both names for the duration of one call, and `cache_state` checks through the public
`Cache.get_seq_length()` that the prefix really was cached.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlpim.engine.batch import PromptBatch
from mlpim.engine.patching import Setter, cached_run, patch_hook
from mlpim.errors import MlpimError


@dataclass
class CacheState:
    """The base run's cache of columns [0, start) and the columns it resumes from `start`."""

    start: int
    past: Any  # the prefix's transformers Cache (deep-copied per call, never mutated); or None
    tokens: Int[Tensor, "b n"]  # columns start..END
    mask: Int[Tensor, "b seq"]  # the whole batch's attention mask
    pos: Int[Tensor, " b"]  # patch column of each row, relative to `start`


def _alias_cache(module, args, kwargs):
    """Forward pre-hook: pass transformers' `cache=` also as `past_key_values=`."""
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


@contextlib.contextmanager
def _cache_kwarg(model):
    """During one call, every attention module sees the cache under both of its names."""
    attns = [block.attn for block in model.blocks]
    handles = [m.register_forward_pre_hook(_alias_cache, with_kwargs=True) for m in attns]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*past_key_values.*deprecated", category=FutureWarning
            )
            yield
    finally:
        for h in handles:
            h.remove()


def prefix(model, tokens: Int[Tensor, "b p"], mask: Int[Tensor, "b p"]):
    """(logits, the model's own KV cache) of a prefix, checked to hold every column."""
    with torch.no_grad(), _cache_kwarg(model):
        logits, past = model(tokens, attention_mask=mask, return_type="logits_and_cache")
    _check_prefix(past, tokens.shape[1])
    return logits, past


def run_from(
    model, tokens: Int[Tensor, "b n"], mask: Int[Tensor, "b seq"], past, hooks=(), **kwargs
):
    """Logits of `tokens` resumed from a deep copy of `past` (None: from scratch), with hooks;
    `kwargs` go to the model (e.g. `logits_to_keep`)."""
    kwargs["attention_mask"] = mask
    if past is not None:
        kwargs["past_key_values"] = copy.deepcopy(past)
    with _cache_kwarg(model):
        return model.run_with_hooks(tokens, fwd_hooks=list(hooks), **kwargs)


def cache_state(model, batch: PromptBatch) -> CacheState:
    """Run the base prompts up to their first patch column and keep the model's cache."""
    start = int(batch.pos.min())
    past = None
    if start > 0:
        _, past = prefix(model, batch.tokens[:, :start], batch.mask[:, :start])
    return CacheState(start, past, batch.tokens[:, start:], batch.mask, batch.pos - start)


def repeat_rows(state: CacheState, n: int) -> CacheState:
    """The state with each row repeated n times in a row (row i·n + j is row i); its cache is a
    copy (`Cache.batch_repeat_interleave` changes a cache in place)."""
    past = copy.deepcopy(state.past)
    if past is not None:
        past.batch_repeat_interleave(n)
    rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731
    return CacheState(state.start, past, rep(state.tokens), rep(state.mask), rep(state.pos))


def base_run(model, batch: PromptBatch, names) -> tuple[Float[Tensor, "b vocab"], dict, CacheState]:
    """(END logits, activation cache of `names`, CacheState) from ONE full forward of the base
    prompts: the model's own KV cache of the whole prompt, cropped (`Cache.crop`) to the columns
    before the first patch column. Where the cache cannot be cropped (a full sliding window),
    the prefix runs again on its own (`cache_state`)."""
    with _cache_kwarg(model):
        (logits, past), acts = cached_run(
            model, batch, names, return_type="logits_and_cache", logits_to_keep=1
        )
    start = int(batch.pos.min())
    state = CacheState(start, None, batch.tokens[:, start:], batch.mask, batch.pos - start)
    if start == 0:
        return logits[:, -1].clone(), acts, state
    try:
        past.crop(start - batch.tokens.shape[1])  # a negative count: remove the columns from start
    except (AttributeError, RuntimeError, ValueError):  # no cache, or one that cannot roll back
        return logits[:, -1].clone(), acts, cache_state(model, batch)
    _check_prefix(past, start)
    state.past = past
    return logits[:, -1].clone(), acts, state


def _check_prefix(past, start: int) -> None:
    """The model's KV cache holds exactly the `start` prefix columns, or stop with one line."""
    cached = past.get_seq_length() if past is not None else 0
    if cached != start:
        raise MlpimError(
            f"the model's KV cache holds {cached} of {start} prefix columns (this "
            "transformers/TransformerLens pair does not fill it); use method.engine=full"
        )


def resume(
    model, state: CacheState, name: str, setter: Setter, source: Float[Tensor, "b ..."]
) -> Float[Tensor, "b vocab"]:
    """END logits with hook `name` patched by `setter` at each row's position."""
    hook = patch_hook(setter, source, state.pos)
    hooks = [(name, hook)]
    return run_from(model, state.tokens, state.mask, state.past, hooks, logits_to_keep=1)[:, -1]


UNEMBED_IN = "unembed.hook_in"  # the input of the model's unembedding (lm_head)


class _Stop(Exception):
    """Raised by a hook to end a forward where its activation is all that is needed."""

    def __init__(self, act: Tensor):
        super().__init__("stop")
        self.act = act


def _stop(act: Tensor, hook=None) -> None:
    raise _Stop(act)


def resume_hidden(
    model, state: CacheState, name: str, setter: Setter, source: Float[Tensor, "b ..."]
) -> Float[Tensor, "b d"]:
    """The END input of the model's unembedding with hook `name` patched by `setter`; the
    forward stops there (no logits)."""
    hooks = [(name, patch_hook(setter, source, state.pos)), (UNEMBED_IN, _stop)]
    try:
        run_from(model, state.tokens, state.mask, state.past, hooks, logits_to_keep=1)
    except _Stop as stop:
        return stop.act[:, -1]
    raise MlpimError(f"the forward never reached {UNEMBED_IN}: use method.engine=full")
