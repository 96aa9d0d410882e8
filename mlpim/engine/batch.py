"""Batches the engine patches: prompts left-padded so that END is the last column of every row.

A task (IOI, facts, a user's JSONL) turns its counterfactual pairs into `PairBatch`es. Each
prompt has one position to patch (`pos`, a column of the padded tensor: END or e.g. the last
subject token), its own answer and a competing answer: LD = logit(answer) - logit(other).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from jaxtyping import Int
from torch import Tensor


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts (`mask` 0 on padding); `pos` is the column patched in each row."""

    tokens: Int[Tensor, "b seq"]
    mask: Int[Tensor, "b seq"]
    pos: Int[Tensor, " b"]
    answer: Int[Tensor, " b"]
    other: Int[Tensor, " b"]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def end(self) -> int:
        """Column of the END token (the last one in every row)."""
        return self.tokens.shape[1] - 1

    @property
    def at_end(self) -> bool:
        """Whether every row is patched at END."""
        return bool((self.pos == self.end).all())

    def to(self, device) -> PromptBatch:
        """The same batch with its tensors on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if torch.is_tensor(v)})

    def head(self, n: int) -> PromptBatch:
        """The first `n` rows, padded as they are (every per-row field cut, in a subclass too)."""
        return replace(self, **{f.name: getattr(self, f.name)[:n] for f in fields(self)})


@dataclass(frozen=True)
class PairBatch:
    """Base and source prompts, with the answer the patched base run should give (`label`).

    `cluster`: per pair, the template (or group) it was drawn from, which the bootstrap resamples
    as a unit (None, or a None entry: a pair is its own cluster).
    """

    base: PromptBatch
    source: PromptBatch
    label: Int[Tensor, " b"]
    cluster: tuple[Hashable, ...] | None = None

    def __len__(self) -> int:
        return len(self.base)

    def to(self, device) -> PairBatch:
        """The same batch with its tensors on `device`."""
        return replace(
            self,
            base=self.base.to(device),
            source=self.source.to(device),
            label=self.label.to(device),
        )

    def head(self, n: int) -> PairBatch:
        """The first `n` pairs, padded as they are."""
        cluster = None if self.cluster is None else self.cluster[:n]
        return PairBatch(self.base.head(n), self.source.head(n), self.label[:n], cluster)


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int
) -> tuple[Int[Tensor, "b seq"], Int[Tensor, "b seq"], Int[Tensor, " b"]]:
    """(tokens, mask, offsets): rows left-padded to one length; offsets[i] = padding of row i."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return tokens, mask, torch.tensor([width - len(r) for r in rows], dtype=torch.long)
