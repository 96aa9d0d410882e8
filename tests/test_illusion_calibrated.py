"""The calibrated illusion_check: references on the tiny model, borderline verdicts, the planted
recipe's properties, and illusion_benchmark end to end (tiny model; a reduced run on SmolLM2)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from mlpim.analysis import illusion, planted
from mlpim.analysis import nullspace as ns
from mlpim.analysis import references as R
from mlpim.config import compose
from mlpim.experiments.common import paper_splits
from mlpim.experiments.illusion_benchmark import CASES, PLOT
from mlpim.run import run

torch.set_num_threads(1)
FAST = ["model=tiny", "device=cpu", "dataset.n_train_pairs=40", "dataset.n_test_pairs=20"]
BENCH = ["experiment=illusion_benchmark", "extra.bench_angles=[30,60]", "extra.random_mlp_epochs=1",
         "extra.n_random_directions=4", "extra.n_natural=2", "extra.dormant_dims=16"]  # fmt: skip


def test_reference_statistics():
    ref = R.Reference("r", (0.0, 1.0, 2.0, 3.0, float("nan")))
    assert ref.percentile(1.0) == 50.0 and ref.percentile(-1) == 0.0
    assert ref.spread == pytest.approx(math.sqrt(5 / 3))
    assert ref.z(1.5) == pytest.approx(0.0) and ref.z(math.inf) == math.inf
    assert math.isnan(R.Reference("empty").spread) and math.isnan(R.Reference("e").percentile(1))


def test_borderline_verdict():
    """The same values give a firm verdict without a reference and a borderline one when the
    margin is below the reference's spread."""
    firm = [illusion.dormant_check(2.16), illusion.component_check(0.467, -0.08)]
    assert illusion.verdict(firm) == (2, "likely illusory")
    wide = R.Reference("natural", (0.5, 1.0, 1.5))  # spread 0.5 > margin 0.16
    refs = R.Refs(natural_dormant=wide)
    close = [illusion.dormant_check(2.16, refs), illusion.component_check(0.467, -0.08, refs)]
    assert close[0].borderline and not close[1].borderline
    assert illusion.verdict(close) == (2, "borderline: caution or likely illusory")
    assert illusion.warning_word(close[0]) == "yes, borderline"
    far = [illusion.dormant_check(5.0, refs), close[1]]
    assert illusion.verdict(far) == (2, "likely illusory")


def test_effect_gate_from_random_directions():
    refs = R.Refs(random_dirs=R.Reference("r", tuple(0.3 + 0.01 * i for i in range(10))))
    gate = illusion.effect_gate(0.25, refs)
    assert not gate.ok and gate.threshold == pytest.approx(refs.random_dirs.quantile(0.99))
    assert not illusion.component_check(0.25, -0.1, refs).warning  # FLDD(v) ≤ random dirs
    assert illusion.component_check(0.25, -0.1).warning  # fixed constant 0.2 alone


def test_generalisation_check():
    assert illusion.generalisation_check(0.6, 0.2).warning
    assert not illusion.generalisation_check(0.6, 0.5).warning
    assert not illusion.generalisation_check(0.1, 0.0).warning  # no train effect to generalise
    # held-out sets apart: one set below half the train effect is enough, and it is named
    held = {"test": 0.55, "new templates": 0.25, "new names": 0.5}
    check = illusion.generalisation_check(0.6, held)
    assert check.warning and check.value == pytest.approx(0.25 / 0.6)
    assert "lowest: new templates" in check.detail
    assert not illusion.generalisation_check(0.6, {**held, "new templates": 0.4}).warning


@pytest.fixture(scope="module")
def tiny_site(tiny_gpt2):
    cfg = compose([*FAST])
    return tiny_gpt2, paper_splits(cfg, tiny_gpt2, "mlp_post", 1)


def test_references_on_tiny_model(tiny_site):
    model, splits = tiny_site
    opts = R.RefOptions(n_random=5, n_natural=3, random_mlp_seeds=0)
    refs = R.site_references(model, splits, "mlp_post", 1, opts, 1.5)
    assert len(refs.random_dirs.values) == 5 and len(refs.natural_dormant.values) == 3
    assert all(abs(f) < 0.5 for f in refs.random_dirs.values)  # random directions do ~nothing
    # real prompts move along natural directions: a finite, non-zero dormant ratio
    assert all(0 < r < math.inf for r in refs.natural_dormant.values)
    assert math.isfinite(refs.fldd_spread) and len(refs.natural_bridging.values) == 3
    base, source = planted.acts(splits["train"])
    nat = R.natural_directions(base, source, 3)
    torch.testing.assert_close(nat @ nat.T, torch.eye(3, dtype=nat.dtype), atol=1e-8, rtol=0)


def test_planted_recipe(tiny_site):
    model, splits = tiny_site
    w_out = ns.mlp_w_out(model, 1)
    dh = planted.pattern_mean_diff(splits["train"])
    irr = planted.irrelevant_direction(w_out, dh)
    assert (irr @ w_out).abs().max() < 1e-5 and irr.norm() == pytest.approx(1.0, abs=1e-6)
    target = torch.randn(w_out.shape[1], generator=torch.Generator().manual_seed(0))
    hidden = torch.cat(planted.acts(splits["train"]))
    exact = planted.dormant_direction(w_out, hidden, target)
    q, e64 = ns.row_space_basis(w_out), exact.double()  # the basis is float64
    torch.testing.assert_close(q @ (q.T @ e64), e64, atol=1e-5, rtol=0)  # in the row space
    assert ns.cosine(exact @ w_out, target) == pytest.approx(1.0, abs=1e-5)  # maps onto target
    low = planted.dormant_direction(w_out, hidden, target, dims=8)
    torch.testing.assert_close(q @ (q.T @ low.double()), low.double(), atol=1e-5, rtol=0)
    assert ns.cosine(low @ w_out, target) > 0
    var = lambda d: (hidden @ d).var().item()  # noqa: E731
    assert var(low) < var(exact)  # least natural variation
    torch.testing.assert_close(planted.oriented(-exact, exact), exact)  # a DAS sign is arbitrary
    assert planted.oriented(exact, exact) is exact
    v = planted.mix(irr, exact, 30.0)
    proj, null = ns.split(v, w_out)
    assert null.norm().item() == pytest.approx(math.cos(math.radians(30)), abs=1e-4)


def test_benchmark_end_to_end(tmp_path):
    df = run(compose([*BENCH, *FAST, "extra.bench_layer_offsets=[0]"]), tmp_path)
    cases = pd.read_csv(tmp_path / CASES)
    assert {"illusory 30°", "illusory 60°", "real mean diff", "real row part",
            "real resid mean diff", "real v_resid (DAS)", "toy e1",
            "toy k=4 illusory"} <= set(cases.case)  # fmt: skip
    assert set(cases.truth) == {"illusory", "real"} and cases.verdict.notna().all()
    text = (tmp_path / "summary.md").read_text()
    assert "Confusion matrix" in text and "Misses" in text and (tmp_path / PLOT).exists()
    assert {"n_warnings", "miss"} <= set(df.metric)
    das = df[(df.intervention == "das") & (df.metric == "fldd")]  # check 6's sets, apart
    assert {"train (changing)", "new templates", "new names"} <= set(das.split)


@pytest.mark.slow
def test_benchmark_smollm2_reduced(smollm2, tmp_path):
    """One layer, two angles, small references on SmolLM2: runs and writes the matrix."""
    overrides = [
        "extra.bench_layer_offsets=[0]",
        "extra.bench_toy=false",
        "device=cpu",
        "dataset.n_train_pairs=40",
        "dataset.n_test_pairs=20",
        "extra.random_mlp_seeds=1",
    ]
    run(compose([*BENCH, *overrides]), tmp_path)
    cases = pd.read_csv(tmp_path / CASES)
    assert len(cases) == 6 and set(cases.layer) == {20}
