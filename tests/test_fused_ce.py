"""The fused unembedding + cross-entropy equals `cross_entropy(h @ W_U + b)` and its gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlpim.engine.fused_ce import unembed_ce, unembed_ce_rows


def _problem(b: int, d: int, vocab: int, scale: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(b, d, generator=gen)
    w_t = torch.randn(vocab, d, generator=gen) * scale / d**0.5
    bias = torch.randn(vocab, generator=gen)
    labels = torch.randint(0, vocab, (b,), generator=gen)
    return h, w_t, bias, labels


def _reference(h, w_t, bias, labels):
    h = h.clone().requires_grad_()
    loss = F.cross_entropy(h @ w_t.T + bias, labels)
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk", [1, 37, 256, 5000])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: logits in the hundreds, softmax near one-hot
def test_loss_and_gradient_match_cross_entropy(chunk, scale):
    h, w_t, bias, labels = _problem(b=7, d=24, vocab=1000, scale=scale)
    ref_loss, ref_grad = _reference(h, w_t, bias, labels)
    x = h.clone().requires_grad_()
    loss = unembed_ce(x, w_t, bias, labels, chunk=chunk)
    (2.5 * loss).backward()  # the incoming gradient is applied
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, ref_loss.abs().item())
    assert (x.grad - 2.5 * ref_grad).abs().max().item() <= 1e-6 * max(1.0, scale)
    assert ref_grad.abs().max() > 1e-3  # a gradient that could be wrong


def test_frozen_weights_required():
    h, w_t, bias, labels = _problem(b=2, d=4, vocab=10, scale=1.0)
    with pytest.raises(ValueError, match="frozen"):
        unembed_ce(h, w_t.requires_grad_(), bias, labels)


@pytest.mark.parametrize("chunk", [37, 5000])
def test_rows_match_cross_entropy_per_row(chunk):
    """`unembed_ce_rows`: each row's loss, and the gradient of any weighting of the rows."""
    h, w_t, bias, labels = _problem(b=7, d=24, vocab=1000, scale=30.0, seed=1)
    weights = torch.linspace(0.5, 2.0, 7)
    x, y = h.clone().requires_grad_(), h.clone().requires_grad_()
    rows = unembed_ce_rows(x, w_t, bias, labels, chunk=chunk)
    ref = F.cross_entropy(y @ w_t.T + bias, labels, reduction="none")
    (rows * weights).sum().backward()
    (ref * weights).sum().backward()
    assert (rows - ref).abs().max().item() <= 1e-4
    assert (x.grad - y.grad).abs().max().item() <= 1e-5 * 30
    assert rows.mean().item() == pytest.approx(unembed_ce(h, w_t, bias, labels, chunk).item())
