"""The measured instrument: bootstrap intervals, the off-distribution measure, the references and
their cache, the planted constructions (minimum-variance preimage, rank-1 real edit), and
illusion_benchmark end to end (tiny model; a reduced run on SmolLM2)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SMALL, end_token_pairs, ld_gradient

from mlpim.analysis import bench_table as T
from mlpim.analysis import divergence, illusion, planted
from mlpim.analysis import illusion_site as S
from mlpim.analysis import measure as M
from mlpim.analysis import nullspace as ns
from mlpim.analysis import references as R
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.checks.off_distribution import off_distribution_check
from mlpim.analysis.editing import edited_w_out
from mlpim.analysis.stats import auc, emd_1d, fldd_est, mean_est, resample
from mlpim.config import compose
from mlpim.engine.interventions import prepare
from mlpim.engine.patching import full, subspace
from mlpim.experiments.common import das_settings, paper_splits
from mlpim.experiments.illusion_benchmark import CASES, PLOTS
from mlpim.run import run
from mlpim.tasks import task_splits

BENCH = [
    "experiment=illusion_benchmark",
    "extra.bench_angles=[30,60]",
    "extra.random_mlp_epochs=1",
    "extra.random_mlp_seeds=2",
    "extra.n_random_directions=4",
    "extra.n_natural=2",
    "extra.n_natural_prompts=200",
    "extra.edit_strengths=[1.0]",
    "extra.pathway_strengths=[1.0]",
    "extra.pathway_angles=[45]",
    "extra.null_norms=[0.3]",
    "extra.bench_edits=[0]",
    "extra.reference_cache=null",
    "method.epochs=2",
]
TH = Thresholds.from_mapping(compose([]).check)


def test_reference_statistics():
    ref = R.Reference("r", (0.0, 1.0, 2.0, 3.0, float("nan")))
    assert ref.percentile(1.0) == 50.0 and ref.percentile(-1) == 0.0
    assert ref.spread == pytest.approx(math.sqrt(5 / 3))
    assert ref.z(1.5) == pytest.approx(0.0) and ref.z(math.inf) == math.inf
    assert math.isnan(R.Reference("empty").spread) and math.isnan(R.Reference("e").percentile(1))


def test_bootstrap_intervals_cover_a_known_mean():
    """95% intervals of an FLDD (clean LD 1, patched LD ~ N(0.3, 1)) cover the true 0.7 in about
    95% of 300 simulated pair sets of 60; and of a mean over 5 seeds, with the coverage a
    percentile bootstrap of 5 values has (it is known to undercover)."""
    rng = np.random.default_rng(0)
    idx = resample(60, 1000, 1)
    hits = 0
    for _ in range(300):
        ld = torch.from_numpy(rng.normal(0.3, 1.0, 60))
        lo, hi = fldd_est(ld, torch.ones(60, dtype=torch.float64), idx).ci(0.95)
        hits += lo <= 0.7 <= hi
    assert 0.90 <= hits / 300 <= 0.99
    few = sum(
        lo <= 0.0 <= hi
        for lo, hi in (mean_est(rng.normal(0, 1, 5), 1000, s).ci(0.95) for s in range(200))
    )
    assert 0.7 <= few / 200 <= 0.99


def test_off_distribution_in_and_out():
    """A patch that puts in real prompts' activations is in distribution (≈ 0 sd); one that
    drives the read-out 5 sd beyond anything natural is out (≈ 5 sd); net of the whole-site patch
    that is ≈ 0 when the source prompts lie there too, ≈ 5 when the patch drives the read part
    with its unread part's variation (the source's own read-out natural)."""
    rng = np.random.default_rng(0)
    natural = torch.from_numpy(rng.normal(0, 1, (2000, 3)))
    w_out = torch.eye(3, dtype=torch.float64)
    base = torch.from_numpy(rng.normal(0, 1, (200, 3)))
    source = torch.from_numpy(rng.normal(0, 1, (200, 3)))
    idx, nat_idx = resample(200, 300, 0), resample(2000, 300, 1)
    e0 = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    off = lambda s, v, w: divergence.off_distribution(base, s, v, w, natural, idx, nat_idx)  # noqa: E731
    inside, full_off = off(source, e0, w_out)
    assert inside.value < 0.2 and full_off.value < 0.2
    pushed = source + 5.0 * e0  # the source prompts, shifted along e0: 5 sd off
    out, full_out = off(pushed, e0, w_out)
    assert out.value == pytest.approx(5.0, abs=0.3) and out.ci(0.95)[0] > 4.0
    assert full_out.value == pytest.approx(5.0, abs=0.3)  # the source prompts themselves
    net = off_distribution_check(out, full_out, R.Refs(), TH)
    assert net.value == pytest.approx(out.value - full_out.value) and abs(net.value) < 0.3
    along_null = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    w_null = torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    bridge = torch.tensor([1.0, 1.0, 0], dtype=torch.float64) / 2**0.5  # unread e0 + read e1
    driven = source + 10.0 * e0  # the unread e0 differs by 10 between source and base
    far = off_distribution_check(*off(driven, bridge, w_null), R.Refs(), TH)
    assert far.value == pytest.approx(5.0, abs=0.4) and far.warning  # e1 driven ≈ 5 sd off
    harmless, _ = off(pushed, along_null, w_null)
    assert harmless.value == 0.0  # moved only where W_out never reads: not measured
    assert emd_1d(np.zeros(10), np.ones(7)) == pytest.approx(1.0)


def test_min_variance_preimage():
    """W_outᵀd = t within 1e-5, and its natural variance is not above the min-norm preimage's."""
    gen = torch.Generator().manual_seed(0)
    m, d = 96, 24
    w_out = torch.randn(m, d, generator=gen, dtype=torch.float64)
    mix = torch.randn(m, m, generator=gen, dtype=torch.float64) * torch.linspace(0.01, 3, m)
    natural = torch.randn(400, m, generator=gen, dtype=torch.float64) @ mix
    target = torch.randn(d, generator=gen, dtype=torch.float64)
    cov = planted.covariance(natural, 1.0)
    dmv = planted.min_variance_preimage(w_out, cov, target)
    dmn = planted.min_norm_preimage(w_out, target)
    torch.testing.assert_close(dmv @ w_out, target, atol=1e-5, rtol=0)
    torch.testing.assert_close(dmn @ w_out, target, atol=1e-5, rtol=0)
    assert dmv @ cov @ dmv <= dmn @ cov @ dmn + 1e-9
    x = natural - natural.mean(0)
    assert (x @ dmv).var() < (x @ dmn).var()
    _, pct = planted.variance_percentile(natural, dmv, w_out, 200, 0)
    assert pct < 50


def test_auc():
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0]), np.array([0.0])) == 0.5


@pytest.fixture(scope="module")
def tiny_site(tiny_gpt2):
    cfg = compose([*SMALL])
    return tiny_gpt2, paper_splits(cfg, tiny_gpt2, "mlp_post", 1, held_out=True)


def test_references_and_their_cache(tiny_site):
    """The site's references on the tiny model; the random-MLP reference is read back from the
    store for the same pairs (no training), and a different seed set is a different key."""
    model, splits = tiny_site
    store = _DictStore()
    opts = S.CheckOptions(n_random_directions=5, n_natural=3, random_mlp_seeds=2, seed=0)
    method = das_settings(compose([*SMALL, "method.epochs=1"]), dim=1)
    natural = torch.cat(M.acts(splits["train"]))
    site, hist = S.check_site(model, splits, "mlp_post", 1, TH, opts, natural, method, store)
    assert len(site.refs.random_dirs.values) == 5 and len(site.refs.natural_dormant.values) == 3
    assert all(abs(f) < 0.5 for f in site.refs.random_dirs.values)  # random directions: ~nothing
    assert all(0 < r < math.inf for r in site.refs.natural_dormant.values)
    assert len(hist) == 2 and len(store.data) == 1 and site.random_mlp is not None
    again, hist2 = S.check_site(model, splits, "mlp_post", 1, TH, opts, natural, method, store)
    assert hist2 == {} and again.refs.random_mlp.values == site.refs.random_mlp.values
    other = R.reference_key(model, splits, 1, method, range(1, 3))
    assert other not in store.data


class _DictStore:
    def __init__(self):
        self.data = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value


def test_planted_real_edit_carries_the_effect(tiny_gpt2):
    """The rank-1 edit makes the MLP write the variable along a residual direction the answer
    reads: in the edited model patching u moves the answer, and so does the whole-MLP patch
    (the construction's own check); before the edit neither does."""
    model = tiny_gpt2
    cfg = compose([*SMALL, "dataset.n_test_pairs=40"])
    pairs = [
        end_token_pairs(model, pb) for pb in task_splits(model.tokenizer, cfg.dataset, 0)["test"]
    ]
    prepared = prepare(model, pairs, "mlp_post", 1, "auto")
    base, source = M.acts(prepared)
    u = planted.centred((source - base).mean(0), torch.cat([base, source]).mean(0))
    natural = torch.cat([base, source]).double() @ u.double()
    assert abs(natural.mean().item()) < 1e-4  # centred: it reads 0 on average
    moved = ((source - base).double() @ u.double()).mean().item()
    target = ld_gradient(model, pairs, 1)
    clean = torch.cat([p.clean_ld for p in prepared]).mean().item()
    alpha = -clean / (moved * target.norm().item())  # first order: the patch undoes the clean LD
    w_before, idx = ns.mlp_w_out(model, 1).clone(), resample(40, 200, 0)
    fldd = lambda prep, setter: M.pair_lds(model, prep, setter).fldd(idx).value  # noqa: E731
    with edited_w_out(model, 1, planted.edit_delta(u, target, alpha)):
        edited = prepare(model, pairs, "mlp_post", 1, "auto")
        f_u, f_full = fldd(edited, subspace(u[:, None])), fldd(edited, full)
        assert ns.cosine(u @ ns.mlp_w_out(model, 1), -target) > 0.9  # u now writes the target
    assert f_u > 0.5 and f_full >= 0.5 * f_u  # the whole MLP carries the effect: u is its mechanism
    assert abs(fldd(prepared, subspace(u[:, None]))) < 0.1  # the unedited MLP: nothing
    torch.testing.assert_close(ns.mlp_w_out(model, 1), w_before, atol=0, rtol=0)  # restored


def test_benchmark_end_to_end(tmp_path):
    df = run(compose([*BENCH, *SMALL, "extra.bench_layer_offsets=[0]"]), tmp_path)
    cases = pd.read_csv(tmp_path / CASES)
    assert {
        "illusory mixing 30°",
        "illusory mixing 60°",
        "illusory pathway ×1 45°",
        "unedited variable direction",
        "unedited read part",
        "real edit (natural 0, ×1)",
        "real edit (natural 0, ×1) read part",
        "edit (natural 0, ×1) + uncorrelated null ‖n‖²=0.3",
        "edit (natural 0, ×1) + correlated null ‖n‖²=0.3",
        "edit (natural 0, ×1) + aligned null ‖n‖²=0.3",
        "edit (natural 0, ×1) variable direction",
        "real resid variable direction",
        "real v_resid (DAS)",
        "toy e1",
        "toy k=4 illusory",
    } <= set(cases.case)
    assert set(cases.truth) <= {"illusory", "real"} and cases.verdict.notna().all()
    assert set(cases.verdict) <= set(T.VERDICT_ORDER)
    assert set(cases.gate_pos) <= {T.ABOVE, T.HOLDS, T.BELOW}
    ill = cases[cases.kind == "pathway"]
    assert (ill.d_pct < 5).all() and ill.beta.gt(0).all() and ill.clean_ratio.notna().all()
    assert cases.rule.nunique() == 1 and cases.rule.iloc[0] == T.rule_hash()
    assert (cases.model == "tiny").all() and (cases.task == "ioi").all()
    text = (tmp_path / "summary.md").read_text()
    assert "Rates" in text and "Misses" in text and T.rule_hash() in text and "Refused" in text
    assert all((tmp_path / p).exists() for p in PLOTS)
    assert (tmp_path / "v_resid_post_L1.pt").exists()
    assert {"score", "miss", "fldd_low"} <= set(df.metric)
    das = df[(df.intervention == "das") & (df.metric == "fldd")]  # the held-out sets, apart
    assert {"train (changing)", "new templates", "new names"} <= set(das.split)


def test_benchmark_takes_any_task(tmp_path):
    """dataset=pronouns (a pairs task): the same families, task and split named on every row."""
    run(compose([*BENCH, *SMALL, "dataset=pronouns", "extra.bench_toy=false"]), tmp_path)
    cases = pd.read_csv(tmp_path / CASES)
    assert (cases.task == "pronouns").all() and (cases.split == "held-out").all()
    assert {"pathway", "mixing", "edit", "hard negative", "Wu control", "residual"} <= set(
        cases.kind
    )


@pytest.mark.slow
def test_benchmark_smollm2_reduced(smollm2, tmp_path):
    """One layer, one angle, one edit, small references on SmolLM2: runs and writes the matrix."""
    overrides = [
        "extra.bench_layer_offsets=[0]",
        "extra.bench_toy=false",
        "device=cpu",
        "dataset.n_train_pairs=40",
        "dataset.n_test_pairs=20",
        "extra.bench_angles=[45]",
        "extra.bench_edits=[0]",
        "extra.pathway_strengths=[1.0]",
        "extra.random_mlp_seeds=1",
        "method.epochs=5",
    ]
    run(compose([*BENCH, *overrides]), tmp_path)
    cases = pd.read_csv(tmp_path / CASES)
    assert set(cases.layer) == {20} and not cases.refused.any()
    edit = cases[cases.case == "real edit (natural 0, ×1)"].iloc[0]
    assert edit.fldd > 0.2 and edit.label != illusion.LIKELY_ILLUSORY
    pathway = cases[cases.kind == "pathway"].iloc[0]
    assert pathway.d_pct < 5 and abs(pathway.clean_ratio - 1) < 0.1
