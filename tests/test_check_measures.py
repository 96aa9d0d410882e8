"""Checks that measure what they say (issue 30, item 5): the off-distribution distance read where
the residual reads (through Gemma's post-feedforward norm), from a natural sample of the pairs'
own split, net of the whole-site patch; a cluster bootstrap over templates, the natural sample
resampled too; the bridging rule against the read part alone (tiny models)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import SMALL
from omegaconf import OmegaConf

from mlpim.analysis import divergence
from mlpim.analysis import measure as M
from mlpim.analysis import references as R
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.checks.nullspace_bridging import bridging_margin, nullspace_check
from mlpim.analysis.stats import ratio_est, resample
from mlpim.config import compose
from mlpim.experiments.common import NATURAL_PATTERNS, natural_site_acts, paper_splits
from mlpim.tasks.ioi import make_prompts
from mlpim.tasks.pairs import Pair, cluster_of

TH = Thresholds.from_mapping(compose([]).check)
G, M_PAIRS = 20, 5  # clusters, pairs per cluster


def test_every_pair_its_own_cluster_is_the_plain_bootstrap():
    plain = resample(37, 50, 3)
    assert np.array_equal(resample(37, 50, 3, [None] * 37), plain)
    assert np.array_equal(resample(37, 50, 3, [f"t{i}" for i in range(37)]), plain)


def test_cluster_bootstrap_draws_templates_then_pairs():
    """20 templates of 5 pairs: each replicate gives each drawn template 5 consecutive slots,
    filled from its own pairs; where the pairs of a template are identical the interval is about
    √5 times the pair bootstrap's, and it covers the true mean of clustered data ~95% of the time
    where the pair bootstrap's covers it ~65%."""
    ids = np.repeat(np.arange(G), M_PAIRS)
    idx = resample(G * M_PAIRS, 1000, 1, list(ids))
    assert idx.shape == (1000, G * M_PAIRS) and idx.min() >= 0 and idx.max() < G * M_PAIRS
    blocks = ids[idx].reshape(1000, G, M_PAIRS)
    assert (blocks == blocks[:, :, :1]).all()
    plain = resample(G * M_PAIRS, 1000, 1)
    y, ones = np.random.default_rng(0).normal(0, 1, G)[ids], np.ones(G * M_PAIRS)
    width = lambda e: np.subtract(*e.ci(0.95)[::-1])  # noqa: E731
    ratio = width(ratio_est(y, ones, idx)) / width(ratio_est(y, ones, plain))
    assert 1.8 < ratio < 2.7
    rng, hits = np.random.default_rng(1), np.zeros(2)
    for _ in range(200):
        y = rng.normal(0, 1, G)[ids] + rng.normal(0, 0.3, G * M_PAIRS)
        for j, i in enumerate((idx, plain)):
            lo, hi = ratio_est(y, ones, i).ci(0.95)
            hits[j] += lo <= 0 <= hi
    assert hits[0] / 200 >= 0.9 and hits[1] / 200 <= 0.8


def test_clusters_of_unequal_size():
    """Templates of 1 and 3 pairs, 100 of each: the templates of 3 fill 3/4 of the slots, their
    share of the pairs."""
    ids = [f"one{i}" for i in range(100)] + [f"three{i // 3}" for i in range(300)]
    idx = resample(400, 200, 2, ids)
    assert idx.shape == (200, 400) and idx.min() >= 0 and idx.max() < 400
    assert (idx >= 100).mean() == pytest.approx(0.75, abs=0.02)
    with pytest.raises(ValueError, match="3 cluster ids for 4 pairs"):
        resample(4, 10, 0, ["a", "a", "b"])


def test_pairs_carry_their_template(tiny_gpt2):
    """IOI pairs: their template; a pairs file: meta.group, else relation and template, else
    none; the site's test resampling is the cluster bootstrap over those."""
    splits = paper_splits(compose(SMALL), tiny_gpt2, "mlp_post", 1)
    test = splits["test"]
    assert all(p.pairs.cluster == p.pairs.base.template for p in test)
    ids = M.clusters(test)
    assert len(ids) == 20 and 1 < len(set(ids)) < 20
    idx = M.bootstrap_indices(splits, 100, 0)
    assert np.array_equal(idx["test"], resample(20, 100, 0, ids))  # seed + 0: "test" sorts first
    pair = lambda meta: Pair("a b", "a c", "b", "c", meta=meta)  # noqa: E731
    assert cluster_of(pair({"group": "g", "template": "t"})) == '["g"]'
    assert cluster_of(pair({"relation": "r", "template": "t", "subject": "s"})) == '["r", "t"]'
    assert cluster_of(pair({"subject": "s"})) is None


def test_natural_sample_from_the_split_of_the_pairs(tiny_gpt2):
    """IOI: prompts of the test split (held-out templates and names) unless the train split is
    asked for; another task: the base and source activations of that split's pairs."""
    cfg = compose(SMALL)
    got = natural_site_acts(cfg, tiny_gpt2, "mlp_post", [1], 40)[1]
    prompts = make_prompts(
        tiny_gpt2.tokenizer, cfg.dataset, "test", NATURAL_PATTERNS, 40, cfg.seed + 7919
    )
    assert torch.equal(got, M.natural_acts(tiny_gpt2, prompts, "mlp_post", [1])[1])
    train = natural_site_acts(cfg, tiny_gpt2, "mlp_post", [1], 40, split="train")[1]
    assert train.shape == got.shape and not torch.allclose(train, got)
    acts = lambda x: SimpleNamespace(base_act=x, source_act=x + 1)  # noqa: E731
    splits = {"train": [acts(torch.zeros(2, 3))], "test": [acts(torch.ones(4, 3))]}
    other = OmegaConf.create({"dataset": {"name": "pairs"}, "seed": 0})
    nat = natural_site_acts(other, None, "mlp_post", [1], 0, splits)[1]
    assert torch.equal(nat, torch.cat([torch.ones(4, 3), 2 * torch.ones(4, 3)]))


def _site(model) -> M.SiteData:
    splits = paper_splits(compose(SMALL), model, "mlp_post", 1)
    natural = torch.cat(M.acts(splits["test"]))
    return M.site_data(model, splits, "mlp_post", 1, TH, R.Refs(), natural)


def _direction(model) -> torch.Tensor:
    v = torch.randn(model.cfg.d_mlp, 1, generator=torch.Generator().manual_seed(0))
    return v / v.norm()


def _off_with(site: M.SiteData, v: torch.Tensor, w: torch.Tensor):
    base, source = M.acts(site.splits["test"])
    return divergence.off_distribution(
        base, source, v, w, site.natural, site.idx["test"], site.natural_idx
    )


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_off_distribution_reads_w_out_itself_without_a_post_norm(family, request):
    """No post-norm: W_out as the residual sees it is W_out itself, and the distances are the raw
    W_out's to the last bit."""
    model = request.getfixturevalue(family)
    site, v = _site(model), _direction(model)
    assert torch.equal(site.w_resid, site.w_out)
    for got, raw in zip(M.off_distances(site, v), _off_with(site, v, site.w_out), strict=True):
        assert got.value == raw.value and np.array_equal(got.boot, raw.boot)


def test_off_distribution_reads_through_gemmas_post_norm(tiny_gemma3):
    """Gemma 3: the distances read W_out through the post-feedforward norm's Jacobian, not the
    raw W_out (which gives other numbers)."""
    site, v = _site(tiny_gemma3), _direction(tiny_gemma3)
    assert not torch.allclose(site.w_resid, site.w_out, rtol=1e-2)
    got = M.off_distances(site, v)
    through = _off_with(site, v, site.w_resid)
    raw = _off_with(site, v, site.w_out)
    assert [e.value for e in got] == [e.value for e in through]
    assert abs(got[0].value - raw[0].value) > 1e-3


def test_off_distribution_is_net_of_the_whole_site_patch(tiny_gpt2):
    """The check's value is distance(v) − distance(whole-site patch), paired replicate by
    replicate; both distances are metric rows; the natural sample is resampled too."""
    site, v = _site(tiny_gpt2), _direction(tiny_gpt2)
    rows, checks = M.measure_checks(tiny_gpt2, site, v, {})
    off, full = M.off_distances(site, v)
    check = next(c for c in checks if c.name == "off_distribution")
    assert check.value == pytest.approx(off.value - full.value, abs=1e-12)
    lo, hi = np.quantile(off.boot - full.boot - TH.off_distribution, [0.025, 0.975])
    assert check.ci == pytest.approx((lo, hi))
    got = {(r["intervention"], r["metric"]): r["value"] for r in rows}
    assert got["das", "off_distance"] == off.value and got["full", "off_distance"] == full.value
    assert site.natural_idx.shape == (TH.n_boot, len(site.natural))
    assert got["null_proj", "fldd"] == pytest.approx(0.0, abs=1e-5)  # null part: 0 by construction


def test_bridging_compares_v_with_its_read_part_alone():
    """FLDD(v) > 1.5 × FLDD(row part)⁺ with ‖null part‖² ≥ 0.1; no null-part term."""
    assert nullspace_check(0.5, 0.3, 0.2, R.Refs(), TH).warning
    assert nullspace_check(0.5, 0.3, 0.2, R.Refs(), TH).margin == pytest.approx(0.05)
    assert not nullspace_check(0.5, 0.34, 0.2, R.Refs(), TH).warning
    assert nullspace_check(0.1, -0.2, 0.2, R.Refs(), TH).margin == pytest.approx(0.1)
    assert not nullspace_check(0.5, 0.1, 0.05, R.Refs(), TH).warning  # too small a null part
    assert bridging_margin(0.5, 0.3, 1.5) == pytest.approx(0.05)


def test_quantiles_are_numpys_linear_method_to_the_bit():
    """The sort-based quantiles equal np.quantile's (linear method) bit for bit, 1-D and 2-D."""
    from mlpim.analysis.stats import quantiles

    rng = np.random.default_rng(0)
    for shape in [(1,), (2,), (7,), (60,), (2000,), (50, 60), (30, 2000), (3, 1)]:
        x = rng.standard_normal(shape) * rng.uniform(0.1, 100)
        ref = np.quantile(x, (np.arange(512) + 0.5) / 512, axis=-1).T
        got = quantiles(x)
        assert got.shape == ref.shape and np.array_equal(got, ref), shape
    x = np.array([1.0, np.nan, 2.0])
    assert np.isnan(quantiles(x)).all()
