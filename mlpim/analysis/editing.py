"""The rank-1 W_out edit that reproduces a 1-D patch of MLP hidden activations at its key.

Patching direction v at key k (the base prompt's mlp_post at the last subject token) sets the
key to k' = k + c·v with c = (k_src − k)·v, which adds c·(v @ W_out) to the MLP output. The edit
ΔW = b ⊗ (c·v @ W_out) (as [d_mlp, d_model], hidden @ W_out) with b = C⁻¹k / (kᵀC⁻¹k) adds the
same at k (kᵀb = 1) and (hᵀb)·c·v @ W_out at any other hidden activation h; C is the second
moment of mlp_post over offline text (ROME's choice of b).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlpim.analysis import recovery as R
from mlpim.engine import metrics
from mlpim.engine.batch import PromptBatch, left_pad
from mlpim.engine.models import hook_name
from mlpim.engine.patching import logits_end
from mlpim.tasks import bos_id, pad_id
from mlpim.tasks.facts import Fact
from mlpim.tasks.pairs import Pair, answer_tokens, encode_prompt


class _Stop(Exception):
    """Ends a forward pass once the last needed layer is read."""


def corpus_tokens(tokenizer, path: str | None, chunk_len: int, n_tokens: int) -> Int[Tensor, "c s"]:
    """The first chunks (BOS + `chunk_len` tokens) of the offline text holding ≥ n_tokens tokens
    (pydoc_data help topics, or the text file at `path`; all chunks when it is shorter)."""
    chunks = R.corpus_chunks(tokenizer, R.corpus_texts(path), chunk_len)
    return chunks[: -(-n_tokens // chunk_len)]


def second_moments(
    model, tokens: Int[Tensor, "c s"], layers: list[int], batch_size: int = 16
) -> tuple[dict[int, Float[Tensor, "m m"]], int]:
    """(C per layer, token count): mean of h hᵀ over the mlp_post activations h of every
    non-BOS token (float64); the forward stops after the last layer's MLP."""
    sums: dict[int, Tensor] = {}

    def reader(layer: int):
        def read(act: Tensor, hook=None) -> None:
            h = act[:, 1:].reshape(-1, act.shape[-1]).double()
            sums[layer] = sums.get(layer, 0) + h.T @ h
            if layer == max(layers):
                raise _Stop

        return read

    for i in range(0, len(tokens), batch_size):
        hooks = [(hook_name("mlp_post", L), reader(L)) for L in layers]
        try:
            with torch.no_grad():
                model.run_with_hooks(
                    tokens[i : i + batch_size].to(model.cfg.device), fwd_hooks=hooks
                )
        except _Stop:
            pass
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    return {L: s / n for L, s in sums.items()}, n


def regularised(cov: Float[Tensor, "m m"], ridge: float) -> tuple[Float[Tensor, "m m"], float]:
    """(C, 0) when C is numerically nonsingular, else (C + λI, λ) with λ = ridge · tr(C)/m."""
    eig = torch.linalg.eigvalsh(cov)
    if eig.min() > 1e-10 * eig.max().clamp_min(1e-300):
        return cov, 0.0
    lam = ridge * (torch.trace(cov) / cov.shape[0]).item()
    return cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device), lam


def key_vectors(cov: Float[Tensor, "m m"], keys: Float[Tensor, "n m"]) -> Float[Tensor, "n m"]:
    """b = C⁻¹k / (kᵀC⁻¹k) for each key k (row), so that kᵀb = 1 (float64)."""
    ck = torch.linalg.solve(cov.double(), keys.double().T).T
    return ck / (keys.double() * ck).sum(1, keepdim=True)


def rank_one_delta(
    w_out: Float[Tensor, "m d"],
    v: Float[Tensor, " m"],
    key: Float[Tensor, " m"],
    source: Float[Tensor, " m"],
    b: Float[Tensor, " m"],
) -> Float[Tensor, "m d"]:
    """ΔW_out = b ⊗ (c · v @ W_out), c = (k_src − k)·v: at key k it adds the patch's output."""
    c = (source.double() - key.double()) @ v.double()
    return torch.outer(b.double(), c * (v.double() @ w_out.double())).to(w_out.dtype)


@contextmanager
def edited_w_out(model, layer: int, delta: Float[Tensor, "m d"]) -> Iterator[None]:
    """Add `delta` to block `layer`'s W_out (in place, in the model's own weight) for the
    duration of the block; the original weight is restored exactly afterwards."""
    mlp = model.blocks[layer].mlp
    weight, view = mlp.out.weight, mlp.W_out  # W_out: [d_mlp, d_model] view of that weight
    if view.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
        raise RuntimeError(f"W_out of layer {layer} is a copy, not a view of the MLP's weight")
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            view.add_(delta.to(view))
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@dataclass
class Probe:
    """One edit's prompts: row 0 the pair's base prompt (answer: base attribute, other: source
    attribute), rows 1.. other facts of its relation (answer: their own attribute)."""

    batch: PromptBatch
    label: int  # the source attribute's token: what the edit should make row 0 say


def probe(tokenizer, pair: Pair, facts: list[Fact], n: int, rng: random.Random) -> Probe:
    """The base prompt of `pair` and up to `n` other facts of its relation (not its subjects)."""
    skip = {pair.meta.get("subject"), pair.meta.get("source_subject")}
    same = [f for f in facts if f.relation == pair.meta.get("relation") and f.subject not in skip]
    chosen = rng.sample(same, min(n, len(same)))
    bos, first = bos_id(tokenizer), lambda w: answer_tokens(tokenizer, w)[0]
    rows = [encode_prompt(tokenizer, bos, t) for t in [pair.base, *(f.prompt for f in chosen)]]
    tokens, mask, _ = left_pad(rows, pad_id(tokenizer))
    answer = torch.tensor([first(pair.base_answer), *(first(f.attribute) for f in chosen)])
    other = torch.full_like(answer, first(pair.source_answer))
    end = torch.full((len(rows),), tokens.shape[1] - 1)
    batch = PromptBatch(tokens=tokens, mask=mask, pos=end, answer=answer, other=other)
    return Probe(batch, first(pair.label_word))


@dataclass
class Effects:
    """Per edit: base LD (base minus source attribute), base argmax == source attribute, and
    over its neighbours the share still right and the share now saying the source attribute."""

    ld: Float[Tensor, " n"]
    hit: Float[Tensor, " n"]
    neighbour_acc: Float[Tensor, " n"]
    neighbour_to_source: Float[Tensor, " n"]


def effects(
    model,
    probes: list[Probe],
    layer: int | None = None,
    delta_for: Callable[[int], Tensor] | None = None,
) -> Effects:
    """Each probe run unpatched, with probe i's own edit `delta_for(i)` of W_out at `layer`
    applied (no edit when `delta_for` is None)."""
    cols: list[list[float]] = [[], [], [], []]
    for i, p in enumerate(probes):
        edit = edited_w_out(model, layer, delta_for(i)) if delta_for else nullcontext()
        b = p.batch.to(model.cfg.device)
        with edit, torch.no_grad():
            logits = logits_end(model, b)
        top = logits.argmax(-1)  # the mean over no neighbours is NaN
        cols[0].append(metrics.logit_diff(logits[:1], b.answer[:1], b.other[:1]).item())
        cols[1].append(float(top[0] == p.label))
        cols[2].append((top[1:] == b.answer[1:]).float().mean().item())
        cols[3].append((top[1:] == p.label).float().mean().item())
    return Effects(*(torch.tensor(c) for c in cols))
