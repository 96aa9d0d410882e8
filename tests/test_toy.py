"""Tests for the toy model of the illusion (mlpim.analysis.toy) and its runner (toy_illusion)."""

import math

import pandas as pd
import pytest
import torch

from mlpim.analysis import toy
from mlpim.config import compose
from mlpim.run import run

# The post's tables, typed in from the post ("Geometric intuition"): (base x, source x) ->
# (hidden before, hidden after, output before, output after).
POST_E1 = {
    (1, -1): ((1, 1, 0), (-1, 1, 0), 1, -1),
    (-1, 1): ((-1, -1, 0), (1, -1, 0), -1, 1),
}
POST_V = {
    (1, -1): ((1, 1, 0), (1, 0, -1), 1, -1),
    (-1, 1): ((-1, -1, 0), (-1, 0, 1), -1, 1),
}
POST_E1_MD = """\
| Patch | Intermediate activation before → after | Output before → after |
|---|---|---|
| Into 1 from −1 | (1, 1, 0) → (−1, 1, 0) | 1 → −1 |
| Into −1 from 1 | (−1, −1, 0) → (1, −1, 0) | −1 → 1 |"""
POST_V_MD = """\
| Patch | Intermediate activation before → after | Output before → after |
|---|---|---|
| Into 1 from −1 | (1, 1, 0) → (1, 0, −1) | 1 → −1 |
| Into −1 from 1 | (−1, −1, 0) → (−1, 0, 1) | −1 → 1 |"""


@pytest.mark.parametrize(("name", "expected"), [("e1", POST_E1), ("v_illusory", POST_V)])
def test_post_tables_numbers(name, expected):
    model = toy.post_model()
    direction = toy.post_directions()[name]
    for (b, s), (h0, h1, y0, y1) in expected.items():
        p = toy.patch(model, direction, b, s)
        assert p.hidden_before.tolist() == pytest.approx(h0, abs=1e-12)
        assert p.hidden_after.tolist() == pytest.approx(h1, abs=1e-12)
        assert p.output_before == pytest.approx(y0, abs=1e-12)
        assert p.output_after == pytest.approx(y1, abs=1e-12)
        assert p.source_output == pytest.approx(s, abs=1e-12)  # the model is the identity


def test_post_tables_markdown():
    tables = toy.post_tables()
    assert tables["e1"] == POST_E1_MD
    assert tables["v_illusory"] == POST_V_MD


def test_patch_uses_the_shared_core(monkeypatch):
    calls = []
    real = toy.subspace_patch

    def spy(base, source, basis):
        calls.append(basis.shape)
        return real(base, source, basis)

    monkeypatch.setattr(toy, "subspace_patch", spy)
    toy.post_tables()
    assert calls == [(3, 1)] * 4


def test_full_patch_gives_source():
    model = toy.post_model()
    for b, s in toy.ALL_PAIRS:
        p = toy.patch(model, toy.full_basis(3), b, s)
        assert p.hidden_after.tolist() == pytest.approx(model.hidden(toy.vec(s))[0].tolist())
        assert p.output_after == pytest.approx(s)


def test_classification():
    model = toy.post_model()
    roles = {
        "e1": "correlated and causal",
        "e2": "correlated but acausal (irrelevant)",
        "e3": "uncorrelated but causal (dormant)",
        "e2+e3": "correlated and causal",
        "2e1+e2-e3": "correlated but acausal (irrelevant)",
        "-e1+e2-e3": "uncorrelated but causal (dormant)",
    }
    frame = toy.classification_frame(model, {**toy.standard_directions(), **toy.rotated_basis()})
    assert dict(zip(frame.direction, frame.role, strict=True)) == roles
    # only the correlated-and-causal directions change the output when patched
    change = dict(zip(frame.direction, frame.patch_output_change, strict=True))
    assert change["e1"] == pytest.approx(2) and change["e2+e3"] == pytest.approx(2)
    for name in ("e2", "e3", "2e1+e2-e3", "-e1+e2-e3"):
        assert change[name] == pytest.approx(0, abs=1e-12)


def test_rotated_basis_is_orthonormal():
    basis = torch.stack(list(toy.rotated_basis().values()), dim=1)
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=basis.dtype), atol=1e-12)


def test_describe_direction_landmarks():
    model = toy.post_model()
    assert toy.describe_direction(model, toy.unit(1, 0, 0))["dormant_share"] == pytest.approx(0)
    assert toy.describe_direction(model, toy.unit(0, 1, 1))["dormant_share"] == pytest.approx(1)
    assert toy.describe_direction(model, toy.unit(1, 1, 0))["dormant_share"] == pytest.approx(0)


def test_das_finds_perfect_solutions():
    seeds = toy.das_seeds(n_seeds=6, steps=200)
    assert (seeds.iia == 1).all() and (seeds.flip_rate == 1).all()
    assert seeds.loss.max() < 1e-6
    norms = seeds[["u1", "u2", "u3"]].pow(2).sum(axis=1)
    assert norms.to_numpy() == pytest.approx([1.0] * len(seeds))
    # every perfect 1-D solution satisfies (u1 + u2)(u1 + 2 u3) = 1
    q = (seeds.u1 + seeds.u2) * (seeds.u1 + 2 * seeds.u3)
    assert q.to_numpy() == pytest.approx([1.0] * len(seeds), abs=1e-3)
    again = toy.das_seeds(n_seeds=2, steps=200)
    assert again[["u1", "u2", "u3"]].equals(seeds[["u1", "u2", "u3"]].iloc[:2])


@pytest.mark.parametrize("k", [1, 3])
def test_higher_dim(k):
    hd = toy.higher_dim(k, extra=2)
    assert hd.model.d == 2 * k + 3
    frame = toy.higher_dim_measures(hd).set_index("intervention")
    for name in ("real", "v_illusory", "full"):
        assert frame.loc[name, "output_after"] == pytest.approx(-1)
        assert frame.loc[name, "iia"] == 1
    for name in ("irrelevant_only", "dormant_only"):
        assert frame.loc[name, "output_after"] == pytest.approx(1)
        assert frame.loc[name, "flip_rate"] == 0
    assert frame.loc["v_illusory", "dormant_activation"] == pytest.approx(1)
    assert frame.loc["full", "dormant_activation"] == 0


def test_runner(tmp_path, monkeypatch):
    import mlpim.experiments.common as common

    def no_model(*a, **kw):
        raise AssertionError("toy_illusion must not load a language model")

    monkeypatch.setattr(common, "model_for", no_model)
    cfg = compose(
        ["experiment=toy_illusion", "extra.n_seeds=3", "extra.das_steps=150", "extra.ks=[1,2]"]
    )
    df = run(cfg, tmp_path)
    assert isinstance(df, pd.DataFrame)
    for name in ("toy_tables.md", "toy_illusion.png", "metrics.csv", "das_seeds.csv", "DONE"):
        assert (tmp_path / name).exists()
    text = (tmp_path / "toy_tables.md").read_text()
    assert POST_E1_MD in text and POST_V_MD in text
    assert set(df.site) == {"hidden"} and set(df.layer) == {0} and set(df.split) == {"all"}
    assert {"e1", "v_illusory", "full", "das", "v_illusory_k2"} <= set(df.intervention)

    def value(intervention, metric, **keys):
        sel = (df.intervention == intervention) & (df.metric == metric)
        for k, v in keys.items():
            sel &= df[k] == v
        (v,) = df[sel].value
        return v

    assert value("v_illusory", "output_after", pair="1<--1") == pytest.approx(-1)
    assert value("v_illusory", "hidden_after_3", pair="1<--1") == pytest.approx(-1)
    assert value("v_illusory", "flip_rate", pair="all") == 1
    assert value("full", "iia", pair="all") == 1
    assert not math.isnan(value("das", "iia", seed=0))
