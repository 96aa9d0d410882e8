"""The nullspace split, the alignment runner's gradient direction, and both runners end to end."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import SMALL

from mlpim.analysis import nullspace as ns
from mlpim.config import compose
from mlpim.engine.batch import PromptBatch
from mlpim.experiments.ioi_alignment import name_mover_gradients, name_mover_objective
from mlpim.run import run
from mlpim.tasks.ioi import make_prompts

ONE_EPOCH = [*SMALL, "method.epochs=1"]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gpt2_compat"])
def test_split_is_exact(fixture, request):
    model = request.getfixturevalue(fixture)
    w = ns.mlp_w_out(model, 1)
    assert w.shape == (model.cfg.d_mlp, model.cfg.d_model) and model.cfg.d_mlp > model.cfg.d_model
    v = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    proj, null = ns.split(v, w)
    q = ns.row_space_basis(w)
    torch.testing.assert_close(proj + null, v)
    assert abs(proj @ null) < 1e-5
    assert (null @ w).abs().max() < 1e-5
    torch.testing.assert_close(q @ (q.T @ proj.double()), proj.double(), atol=1e-5, rtol=0)
    assert null.norm() > 0.5  # d_mlp = 2 d_model: about half of a random v is in the nullspace
    assert q.shape[1] == (
        model.cfg.d_model - 1 if fixture.endswith("compat") else model.cfg.d_model
    )


def test_w_out_reproduces_mlp_out(tiny_llama):
    from mlpim.experiments.ioi_nullspace import check_w_out

    tokens = torch.randint(3, 50, (2, 9))
    batch = PromptBatch(tokens, torch.ones_like(tokens), *[torch.full((2,), 8)] * 3)
    assert check_w_out(tiny_llama, 1, batch) < 1e-5


def test_gradient_matches_finite_difference(tiny_gpt2):
    cfg = compose(["model=tiny"]).dataset
    batch = make_prompts(tiny_gpt2.tokenizer, cfg, "train", ("ABB", "BAB"), 4, 0)[0]
    heads = [(2, 0), (2, 3)]
    grad = name_mover_gradients(tiny_gpt2, batch, 1, heads)
    u = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1))
    u = u / u.norm(dim=1, keepdim=True)
    eps = 1e-2
    with torch.no_grad():
        f = lambda d: name_mover_objective(tiny_gpt2, batch, 1, heads, d).double()  # noqa: E731
        fd = (f(eps * u) - f(-eps * u)) / (2 * eps)
    torch.testing.assert_close((grad * u).sum(1).double(), fd, atol=2e-3, rtol=2e-2)


def test_gradient_signed_by_name_order(tiny_gpt2):
    """The reference gradient is first name minus second name: IO − S1 on ABB, S1 − IO on BAB."""
    from mlpim.experiments.ioi_alignment import signed_gradients

    cfg = compose(["model=tiny"]).dataset
    batch = make_prompts(tiny_gpt2.tokenizer, cfg, "train", ("ABB", "BAB"), 8, 0)[0]
    heads = [(2, 0), (2, 3)]
    grads, signs = signed_gradients(tiny_gpt2, [batch], 1, heads)
    assert signs.tolist() == [1.0 if p == "ABB" else -1.0 for p in batch.pattern]
    raw = name_mover_gradients(tiny_gpt2, batch, 1, heads)
    torch.testing.assert_close(grads, raw * signs[:, None])


def test_ioi_nullspace_end_to_end(tmp_path):
    df = run(compose(["experiment=ioi_nullspace", *ONE_EPOCH, "extra.n_hist_prompts=40"]), tmp_path)
    got = df.pivot_table(index=["intervention", "split"], columns="metric", values="value")
    for name in ("das", "row_proj", "null_proj", "span2", "full"):
        assert {"fldd", "iia", "logit_diff", "flip_rate"} <= set(
            got.loc[(name, "test")].dropna().index
        )
    norms = got["norm_sq"].dropna()
    assert norms.sum() == pytest.approx(1.0, abs=1e-5)
    # the nullspace part cannot change the output: its patch is the clean run
    assert got.loc[("null_proj", "test"), "fldd"] == pytest.approx(0.0, abs=1e-4)
    span2, row = got.loc[("span2", "test"), "fldd"], got.loc[("row_proj", "test"), "fldd"]
    assert span2 == pytest.approx(row, abs=1e-5)  # the nullspace half of the 2-D patch is inert
    assert got.loc[("null_proj", "test"), "separation"] >= 0
    for f in ("nullspace_hist.png", "interventions.png", "subspace.pt", "metrics.csv"):
        assert (tmp_path / f).exists()


def test_ioi_alignment_end_to_end(tmp_path):
    overrides = ["extra.n_random=200", "extra.n_grad_prompts=20", "model.landmarks.name_movers=[]"]
    df = run(compose(["experiment=ioi_alignment", *ONE_EPOCH, *overrides]), tmp_path)
    wide = df.pivot_table(index="intervention", columns="metric", values="value")
    for pair in ("v_mlp_out_vs_das_resid", "v_mlp_out_vs_grad_resid", "das_resid_vs_grad_resid"):
        assert 0 <= wide.loc[pair, "cosine"] <= 1
    assert 0 < wide.loc["random_vs_das_resid", "random_cosine_mean"] < 1
    assert (df.metric == "head_fldd").sum() == 3  # no listed name movers: top heads by |FLDD|
    assert -1 <= wide.loc["grad_abb_vs_bab", "cosine"] <= 1
    assert (tmp_path / "alignment.png").exists()
    assert isinstance(pd.read_csv(tmp_path / "metrics.csv"), pd.DataFrame)


def test_alignment_reuses_saved_directions(tmp_path):
    run(
        compose(["experiment=ioi_nullspace", *ONE_EPOCH, "extra.n_hist_prompts=40"]), tmp_path / "a"
    )
    resid = tmp_path / "a" / "subspace.pt"  # wrong site on purpose: must be refused
    with pytest.raises(Exception, match="mlp_post"):
        run(
            compose(["experiment=ioi_alignment", *ONE_EPOCH, f"extra.resid_direction={resid}"]),
            tmp_path / "b",
        )
    overrides = [f"direction={resid}", "extra.n_random=100", "extra.n_grad_prompts=20"]
    df = run(compose(["experiment=ioi_alignment", *ONE_EPOCH, *overrides]), tmp_path / "c")
    assert not (tmp_path / "c" / "das_mlp_post").exists()  # loaded, not trained
    assert (df.metric == "cosine").sum() == 4  # three pairs and the ABB-vs-BAB agreement
