"""Cross-entropy over the full vocabulary fused with the unembedding, in one pass over W_U.

DAS trains against frozen weights, so the only gradient the loss needs is the one with respect to
the final hidden state: `(softmax(h W_U + b) - onehot) W_Uᵀ / b`. `unembed_ce` computes the loss
and that gradient together, chunk by chunk over the vocabulary with an online softmax, so each
chunk of W_U is read from memory once and reused from cache for the gradient; the logits are never
materialised. Loss and gradient equal `cross_entropy(h @ W_U + b, labels)` and its autograd
gradient (tests/test_fused_ce.py).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

CHUNK = 1024


def _rows(
    h: Float[Tensor, "b d"],
    w_t: Float[Tensor, "vocab d"],
    bias: Float[Tensor, " vocab"],
    labels: Int[Tensor, " b"],
    chunk: int,
) -> tuple[Float[Tensor, " b"], Float[Tensor, "b d"]]:
    """Each row's cross-entropy and its gradient with respect to the row's h."""
    b = h.shape[0]
    run_max = h.new_full((b, 1), -torch.inf)
    run_sum = h.new_zeros((b, 1))
    acc = h.new_zeros(h.shape)  # sum_v exp(logit_v - run_max) w_v
    for start in range(0, w_t.shape[0], chunk):
        w = w_t[start : start + chunk]
        logits = torch.addmm(bias[start : start + chunk], h, w.t())
        new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))
        rescale = torch.exp(run_max - new_max)
        e = torch.exp(logits - new_max)
        run_sum = run_sum * rescale + e.sum(1, keepdim=True)
        acc = torch.addmm(acc * rescale, e, w)
        run_max = new_max
    target = w_t[labels]
    label_logit = (h * target).sum(1) + bias[labels]
    return run_max[:, 0] + run_sum[:, 0].log() - label_logit, acc / run_sum - target


class _UnembedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w_t, bias, labels, chunk):  # noqa: D102
        rows, grad = _rows(h, w_t, bias, labels, chunk)
        ctx.save_for_backward(grad / h.shape[0])
        return rows.mean()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None, None, None


class _UnembedCERows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w_t, bias, labels, chunk):  # noqa: D102
        rows, grad = _rows(h, w_t, bias, labels, chunk)
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad_out[:, None] * grad, None, None, None, None


def _frozen(w_t: Tensor, bias: Tensor) -> None:
    if w_t.requires_grad or bias.requires_grad:
        raise ValueError("unembed_ce treats the unembedding as frozen; detach its weights")


def unembed_ce(
    h: Float[Tensor, "b d"],
    w_t: Float[Tensor, "vocab d"],
    bias: Float[Tensor, " vocab"],
    labels: Int[Tensor, " b"],
    chunk: int = CHUNK,
) -> Tensor:
    """Mean cross-entropy of `h @ w_tᵀ + bias` against `labels`, on the unembedding's device;
    differentiable in `h` only."""
    _frozen(w_t, bias)
    return _UnembedCE.apply(h.to(w_t.device), w_t, bias, labels.to(w_t.device), chunk)


def unembed_ce_rows(
    h: Float[Tensor, "b d"],
    w_t: Float[Tensor, "vocab d"],
    bias: Float[Tensor, " vocab"],
    labels: Int[Tensor, " b"],
    chunk: int = CHUNK,
) -> Float[Tensor, " b"]:
    """Each row's cross-entropy of `h @ w_tᵀ + bias` against `labels`, on the unembedding's
    device; differentiable in `h`."""
    _frozen(w_t, bias)
    return _UnembedCERows.apply(h.to(w_t.device), w_t, bias, labels.to(w_t.device), chunk)
