"""Metrics on hand-made logits, the subspace-patch formula, and the trainable orthonormal basis."""

from __future__ import annotations

import pytest
import torch

from mlpim.engine import metrics, patching
from mlpim.engine.subspace import RotatedSubspace

# 3 prompts over a 4-token vocabulary; IO and S token ids per prompt
LOGITS = torch.tensor(
    [
        [1.0, 4.0, 2.0, 0.0],  # argmax 1
        [3.0, 0.5, 0.0, 2.5],  # argmax 0
        [0.0, 1.0, 2.0, 5.0],  # argmax 3
    ]
)
IO = torch.tensor([1, 3, 2])
S = torch.tensor([2, 0, 3])


def test_logit_diff():
    # 4 - 2, 2.5 - 3, 2 - 5
    torch.testing.assert_close(metrics.logit_diff(LOGITS, IO, S), torch.tensor([2.0, -0.5, -3.0]))


def test_accuracy_and_iia():
    assert metrics.accuracy(LOGITS, IO) == pytest.approx(1 / 3)  # only prompt 0
    assert metrics.accuracy(LOGITS, S) == pytest.approx(2 / 3)  # prompts 1 and 2
    assert metrics.accuracy(LOGITS, torch.tensor([1, 0, 3])) == pytest.approx(1.0)
    assert metrics.iia(LOGITS, torch.tensor([1, 3, 3])) == pytest.approx(2 / 3)
    assert metrics.iia(LOGITS, torch.tensor([2, 2, 2])) == pytest.approx(0.0)


def test_fldd():
    clean = torch.tensor([3.0, 1.0])  # mean 2
    assert metrics.fldd(torch.tensor([1.0, 1.0]), clean) == pytest.approx(0.5)  # mean 1
    assert metrics.fldd(clean, clean) == pytest.approx(0.0)
    assert metrics.fldd(torch.zeros(2), clean) == pytest.approx(1.0)
    # a flip on average: mean patched LD -1 -> 1 - (-1 / 2) = 1.5 (over 100%)
    assert metrics.fldd(torch.tensor([-3.0, 1.0]), clean) == pytest.approx(1.5)
    # a patch that helps: mean 3 -> -0.5
    assert metrics.fldd(torch.tensor([4.0, 2.0]), clean) == pytest.approx(-0.5)


def test_flip_rate():
    clean = torch.tensor([2.0, 1.0, -1.0, 0.5])
    patched = torch.tensor([-1.0, 0.5, 1.0, 3.0])  # prompts 0 and 2 change sign
    assert metrics.flip_rate(patched, clean) == pytest.approx(0.5)
    assert metrics.flip_rate(clean, clean) == pytest.approx(0.0)
    assert metrics.flip_rate(-clean, clean) == pytest.approx(1.0)


def test_subspace_patch_one_direction_formula():
    gen = torch.Generator().manual_seed(0)
    d = 7
    base, source = torch.randn(5, d, generator=gen), torch.randn(5, d, generator=gen)
    v = torch.randn(d, generator=gen)
    v = v / v.norm()
    want = base + ((source - base) @ v)[:, None] * v[None, :]
    got = patching.subspace_patch(base, source, v[:, None])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(patching.subspace(v[:, None])(base, source), want)
    # hand-computed case: x_A = (1, 2), x_B = (3, -1), v = e_1 -> (3, 2)
    e1 = torch.tensor([[1.0], [0.0]])
    out = patching.subspace_patch(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]), e1)
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.0]]))


def test_subspace_patch_full_basis_is_full_patch():
    gen = torch.Generator().manual_seed(1)
    base, source = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=gen))[0]
    torch.testing.assert_close(patching.subspace_patch(base, source, basis), source)
    torch.testing.assert_close(patching.full(base, source), source)


def test_head_setter_replaces_one_head():
    base, source = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    out = patching.head(1)(base, source)
    assert out[:, 1].eq(1).all() and out[:, 0].eq(0).all() and out[:, 2].eq(0).all()
    assert base.eq(0).all()  # the base activation is not modified in place


@pytest.mark.parametrize(("d", "k"), [(8, 1), (8, 3), (5, 5)])
def test_rotated_subspace_stays_orthonormal(d, k):
    torch.manual_seed(0)
    rot = RotatedSubspace(d, k, generator=torch.Generator().manual_seed(0))
    assert rot.basis.shape == (d, k)
    opt = torch.optim.Adam(rot.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    base, source = torch.randn(16, d, generator=gen), torch.randn(16, d, generator=gen)
    target = torch.randn(16, d, generator=gen)
    start = rot.basis.detach().clone()
    for _ in range(20):
        loss = (rot(base, source) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    basis = rot.basis.detach()
    torch.testing.assert_close(basis.T @ basis, torch.eye(k), atol=1e-5, rtol=0)
    if k < d:  # the basis did move (k = d spans everything whatever the rotation)
        assert (basis - start).abs().max() > 1e-3


@pytest.mark.parametrize(("d", "k"), [(4, 5), (4, 0), (4, -1)])
def test_rotated_subspace_rejects_bad_dim(d, k):
    with pytest.raises(ValueError, match="subspace dim"):
        RotatedSubspace(d, k)
