"""mlp_recovery and ioi_neuron_budget on the tiny models: the probes, the resid_mid hook, the
neuron-restricted basis, and both experiments end to end (small sizes)."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from mlpim import constants as C
from mlpim.analysis import recovery as R
from mlpim.analysis.budget import NeuronSubspace, grid, linear_fit, neuron_order
from mlpim.config import compose
from mlpim.run import run

LAYER = 1


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file of filled-in IOI sentences: words the tiny models' tokenizer knows."""
    d, rng = compose(["model=tiny"]).dataset, random.Random(0)
    pick = lambda xs: rng.choice(list(xs))  # noqa: E731
    text = " ".join(
        pick(d.templates).format(
            A=pick(d.names),
            B=pick(d.names),
            S=pick(d.names),
            PLACE=pick(d.places),
            OBJECT=pick(d.objects),
        )
        + f" {pick(d.names)}."
        for _ in range(300)
    )
    path = tmp_path_factory.mktemp("corpus") / "ioi.txt"
    path.write_text(text)
    return path


def _tokens(model, corpus, n=64, per=8):
    tokens = R.corpus_chunks(model.tokenizer, R.corpus_texts(str(corpus)), 24)
    chunks, pos = R.sample_positions(len(tokens), tokens.shape[1], n, per, torch.Generator())
    return tokens[chunks], pos


def test_ridge_recovers_planted_readout_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 40, generator=gen)
    train, test = R.split_indices(600, 400, 200, gen)
    planted = x @ torch.randn(40, generator=gen) + 3.0
    noise = torch.randn(600, generator=gen)
    r2 = R.ridge_r2(x, torch.stack([planted, noise], dim=1), train, test)
    assert r2[0] > 0.99 and abs(r2[1]) < 0.1
    assert R.ridge_r2(x, planted, train, test)[0] == pytest.approx(r2[0])


def test_logistic_separates_a_shift_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=gen)
    train, test = R.split_indices(600, 400, 200, gen)
    signs = R.balanced_signs(600, train, test)
    assert signs[train].sum() == 0 and signs[test].sum() == 0
    assert R.logistic_accuracy(x + signs[:, None], signs, train, test) > 0.95
    assert R.logistic_accuracy(x, signs, train, test, c=1e-2) < 0.65


def test_corpus_chunks_and_positions(tiny_gpt2, corpus):
    tokens, pos = _tokens(tiny_gpt2, corpus, n=30, per=8)
    assert tokens.shape[1] == 25 and (tokens[:, 0] == tiny_gpt2.tokenizer.bos_token_id).all()
    assert pos.shape == (4, 8) and pos.min() >= 1 and pos.max() < 25
    assert (pos.diff(dim=1) > 0).all()  # distinct, sorted
    assert len(R.corpus_texts()) > 10  # pydoc_data ships with Python


def test_collect_matches_cache(model, corpus):
    tokens, pos = _tokens(model, corpus)
    acts = R.collect(model, tokens, pos, [0, LAYER], batch_size=3)
    _, cache = model.run_with_cache(tokens)
    for layer in (0, LAYER):
        for got, name in (
            (acts.mid, "blocks.{}.hook_resid_mid"),
            (acts.post, "blocks.{}.mlp.hook_post"),
        ):
            want = cache[name.format(layer)][torch.arange(len(pos))[:, None], pos]
            torch.testing.assert_close(got[layer], want.reshape(len(got[layer]), -1))


def test_resid_mid_hook_changes_mlp_and_matches_direct(model, corpus):
    """The hook on blocks.L.hook_resid_mid feeds the MLP: its activations move, exactly as the
    MLP applied to the perturbed resid_mid (the fast path) predicts."""
    tokens, pos = _tokens(model, corpus)
    acts = R.collect(model, tokens, pos, [LAYER])
    mid = acts.mid[LAYER]
    signs = torch.ones(len(mid))
    signs[::2] = -1
    v = R.random_directions(mid.shape[1], 1, torch.Generator().manual_seed(1))[:, 0]
    delta = R.perturbation(mid, v, 0.1, signs)
    hooked = R.post_with_hook(model, tokens, pos, LAYER, delta, batch_size=3)
    assert (hooked - acts.post[LAYER]).abs().max() > 1e-3
    torch.testing.assert_close(hooked, R.post_from_mid(model, LAYER, mid + delta))
    torch.testing.assert_close(R.post_from_mid(model, LAYER, mid), acts.post[LAYER])
    torch.testing.assert_close(
        R.post_with_hook(model, tokens, pos, LAYER, 0 * delta), acts.post[LAYER]
    )


def test_perturbation_scale():
    mid = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    v, signs = torch.tensor([1.0, 0.0]), torch.tensor([1.0, -1.0])
    torch.testing.assert_close(
        R.perturbation(mid, v, 0.1, signs), torch.tensor([[0.75, 0], [-0.75, 0]])
    )
    token = R.perturbation(mid, v, 0.1, signs, "token")
    torch.testing.assert_close(token, torch.tensor([[0.5, 0], [-1.0, 0]]))


@pytest.mark.parametrize("subset", ["first", "random"])
def test_neuron_basis_is_zero_outside_subset_and_orthonormal(subset):
    d, n, k = 50, 12, 3
    order = neuron_order(d, subset, torch.Generator().manual_seed(0))
    basis = NeuronSubspace(d, order[:n], k, torch.Generator().manual_seed(0)).basis.detach()
    outside = torch.ones(d, dtype=torch.bool)
    outside[order[:n]] = False
    assert basis.shape == (d, k) and basis[outside].abs().max() == 0
    torch.testing.assert_close(basis.T @ basis, torch.eye(k), atol=1e-5, rtol=0)
    if subset == "first":
        assert not outside[:n].any()


def test_neuron_patch_leaves_other_neurons():
    module = NeuronSubspace(10, torch.tensor([2, 5]), 1)
    base, source = torch.zeros(4, 10), torch.randn(4, 10)
    patched = module(base, source).detach()
    assert patched[:, [0, 1, 3, 4, 6, 7, 8, 9]].abs().max() == 0


def test_grid_and_fit():
    assert grid([8, 32, 128, 512, "all"], 128) == [8, 32, 128]
    fit = linear_fit(torch.arange(5.0).numpy(), (2 * torch.arange(5.0) + 1).numpy())
    assert fit["slope"] == pytest.approx(2) and fit["r2_fit"] == pytest.approx(1)


def test_mlp_recovery_end_to_end(corpus, tmp_path):
    cfg = compose(
        [
            "experiment=mlp_recovery",
            "model=tiny",
            "device=cpu",
            f"extra.corpus_path={corpus}",
            "extra.chunk_len=24",
            "extra.n_activations=200",
            "extra.n_train=150",
            "extra.layers=[0,2]",
            "extra.n_directions=2",
            "extra.z_values=[0.01,0.5]",
        ]
    )
    df = run(cfg, tmp_path)
    assert set(df.intervention) == {"ridge", "logistic"} and set(df.layer) == {0, 2}
    assert len(df[df.metric == "r2"]) == 4 and len(df[df.metric == "accuracy"]) == 4
    assert df[df.metric == "r2"].value.between(-1, 1).all()
    assert (df[(df.metric == "accuracy") & (df.z == 0.5)].value > 0.6).all()
    for name in ("recovery_r2.png", "recovery_logistic.png", "summary.md", C.DONE):
        assert (tmp_path / name).exists()
    assert pd.read_csv(tmp_path / C.METRICS).z.notna().sum() == 4


def test_ioi_neuron_budget_end_to_end(tmp_path):
    cfg = compose(
        [
            "experiment=ioi_neuron_budget",
            "model=tiny",
            "device=cpu",
            "dataset.n_train_pairs=40",
            "dataset.n_test_pairs=40",
            "method.epochs=1",
            "extra.n_grid=[4,16,all]",
        ]
    )
    df = run(cfg, tmp_path)
    test = df[(df.split == "test") & (df.metric == "fldd")]
    assert set(test.intervention) >= {"das_n4", "das_n16", "das_n128", "full"}
    assert set(df[df.intervention == "fldd_vs_n_fit"].metric) == {"slope", "intercept", "r2_fit"}
    assert (tmp_path / "neuron_budget.png").exists() and (tmp_path / C.DONE).exists()
