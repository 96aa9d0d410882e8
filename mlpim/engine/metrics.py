"""IOI metrics on END logits. Fractions, not percent."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor


def logit_diff(
    logits: Float[Tensor, "b vocab"], io: Int[Tensor, b], s: Int[Tensor, b]
) -> Float[Tensor, b]:
    """logit(IO) - logit(S) per prompt."""
    return logits.gather(1, io[:, None])[:, 0] - logits.gather(1, s[:, None])[:, 0]


def column_diff(
    h: Float[Tensor, "b d"],
    w_t: Float[Tensor, "vocab d"],
    bias: Float[Tensor, " vocab"],
    io: Int[Tensor, b],
    s: Int[Tensor, b],
) -> Float[Tensor, b]:
    """logit(IO) − logit(S) per row of `h @ w_tᵀ + bias`, from those two columns only."""
    logit = lambda t: (h * w_t[t]).sum(-1) + bias[t]  # noqa: E731
    return logit(io) - logit(s)


def accuracy(logits: Float[Tensor, "b vocab"], target: Int[Tensor, b]) -> float:
    """Share of prompts whose argmax over the whole vocabulary is `target`."""
    return (logits.argmax(-1) == target).float().mean().item()


def iia(logits: Float[Tensor, "b vocab"], label: Int[Tensor, b]) -> float:
    """Interchange-intervention accuracy: argmax equals the patched answer."""
    return accuracy(logits, label)


# FLDD divides by the mean clean logit difference (nats). Below 1 nat the base answer is less
# than e ≈ 2.7 times as likely as the source answer, and check.min_effect = 0.2 then asks for a
# change of under 0.2 nat; as the mean approaches 0 (or turns negative when the model gets some
# pairs wrong) FLDD grows without bound, or flips sign, for small changes of LD.
MIN_CLEAN_LD = 1.0


def fldd(ld_patched: Float[Tensor, b], ld_clean: Float[Tensor, b]) -> float:
    """Fraction of logit-difference decrease, 1 - mean(LD_patched) / mean(LD_clean)."""
    return 1.0 - ld_patched.mean().item() / ld_clean.mean().item()


def flip_rate(ld_patched: Float[Tensor, b], ld_clean: Float[Tensor, b]) -> float:
    """Share of prompts whose IO-vs-S preference changes sign under the patch."""
    return ((ld_patched > 0) != (ld_clean > 0)).float().mean().item()
