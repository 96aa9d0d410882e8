"""ioi_dormant and ioi_random_mlp on the tiny models: the random MLP's norm match and its patch,
the dormant combos, and both experiments end to end (1 DAS epoch, few pairs)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import SMALL

from mlpim import constants as C
from mlpim.analysis.controls import (
    RandomMLPPatch,
    matched_random_mlp,
    random_patch,
    split_acts,
    with_resid_mid,
)
from mlpim.analysis.dormant import dormant_combos, layer_note, projection_stats, same_position
from mlpim.config import compose
from mlpim.engine.interventions import patched_end_logits, prepare
from mlpim.run import run
from mlpim.tasks.ioi import paper_pairs

PAIRS = [*SMALL, "dataset.n_test_pairs=40"]
ONE_EPOCH = [*PAIRS, "method.epochs=1"]
LAYER = 1


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def _aug(model, split: str):
    """Paper pairs of a split prepared at mlp_out; source acts [mlp_out | mid | base mid]."""
    cfg = compose(PAIRS)
    batches = paper_pairs(model.tokenizer, cfg.dataset, split, cfg.seed)
    return with_resid_mid(model, prepare(model, batches, "mlp_out", LAYER), LAYER)


def test_random_mlp_output_norm_matches_real(model):
    """Calibrated on the train prompts; held-out test prompts within 5% of the real MLP's norm."""
    d = model.cfg.d_model
    mlp = matched_random_mlp(model, *split_acts(_aug(model, "train"), d), seed=0)
    mid, real = split_acts(_aug(model, "test"), d)
    with torch.no_grad():
        ratio = mlp(mid).norm(dim=-1).mean() / real.norm(dim=-1).mean()
    assert abs(ratio.item() - 1) < 0.05
    assert mlp.w1.shape == (d, model.cfg.d_mlp)


def test_random_patch_adds_random_mlp_difference(model):
    """mlp_out' - mlp_out = f(h') - f(h_base) for h' the subspace patch of the hidden acts."""
    d = model.cfg.d_model
    mid, real = split_acts(_aug(model, "train"), d)
    mlp = matched_random_mlp(model, mid, real, seed=1)
    basis = torch.linalg.qr(torch.randn(model.cfg.d_mlp, 2))[0]
    mid_b, mid_s, out_b = mid[:10], mid[10:20], real[:10]
    hb, hs = mlp.hidden(mid_b), mlp.hidden(mid_s)
    h_new = hb + ((hs - hb) @ basis) @ basis.T
    expected = out_b + mlp.out(h_new) - mlp.out(hb)
    torch.testing.assert_close(random_patch(mlp, basis, out_b, mid_b, mid_s), expected)


def test_identical_base_and_source_change_nothing(model):
    """Patching a prompt's own random hidden acts leaves the logits as the clean run's."""
    aug = _aug(model, "train")
    mlp = matched_random_mlp(model, *split_acts(aug, model.cfg.d_model), seed=2)
    patch = RandomMLPPatch(mlp, dim=1, generator=torch.Generator().manual_seed(0))
    d = model.cfg.d_model
    for p in aug[:2]:  # the source is the base: its own mlp_out and resid_mid, twice
        own = torch.cat([p.base_act, p.source_act[:, 2 * d :], p.source_act[:, 2 * d :]], -1)
        same = p.__class__(**{**p.__dict__, "source_act": own})
        with torch.no_grad():
            logits = patched_end_logits(model, same, patch)
            clean = p.clean_logits
        torch.testing.assert_close(logits, clean, atol=1e-4, rtol=1e-4)


def test_dormant_combos_and_stats():
    combos = dormant_combos()
    assert len(combos) == len(set(combos)) == 8
    assert sum(same_position(*c) for c in combos) == 4
    assert all(("C" in b) != ("C" in s) for b, s in combos)  # disjoint name sets
    stats = projection_stats(torch.tensor([3.0, 5.0]), torch.tensor([-1.0, 1.0]))
    assert stats["das"]["dormant_ratio"] == pytest.approx(4.0 / 2**0.5)
    assert "WARNING" in layer_note(5, 4) and "WARNING" not in layer_note(4, 4)


def test_dormant_then_random_mlp_end_to_end(tmp_path):
    """ioi_dormant trains v_MLP and v_true; ioi_random_mlp reuses that v_MLP (`direction=`)."""
    df = run(compose(["experiment=ioi_dormant", *ONE_EPOCH, "extra.n_per_combo=6"]), tmp_path / "d")
    assert {"combo", "same_position"} <= set(df.columns)
    assert df.combo.nunique() == 8 and set(df.intervention) == {"clean", "das"}
    for name in ("dormant.png", C.SUMMARY, "projections.csv", f"v_mlp_post_L{LAYER}.pt"):
        assert (tmp_path / "d" / name).exists()
    das = df[df.intervention == "das"]
    assert {"proj_mean", "proj_std", "dormant_ratio", "fldd", "iia"} <= set(das.metric)

    v_mlp = tmp_path / "d" / f"v_mlp_post_L{LAYER}.pt"
    cfg = compose(
        ["experiment=ioi_random_mlp", *ONE_EPOCH, f"direction={v_mlp}", "extra.random_mlp_seeds=2"]
    )
    df = run(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / f"das_mlp_post_L{LAYER}").exists()  # v_MLP loaded, not trained
    assert {"random_mlp", "das", "full", "clean"} == set(df.intervention)
    rand = df[(df.intervention == "random_mlp") & (df.metric == "fldd")]
    assert sorted(rand.seed.unique()) == [0, 1] and set(rand.split) == {"train", "test"}
    assert (tmp_path / "r" / "random_mlp.png").exists()
    assert pd.read_csv(tmp_path / "r" / C.METRICS).value.notna().any()
