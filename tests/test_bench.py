"""illusion_benchmark's instrument: exact intervals, the gate position, the rates over a case
table, the frozen hash, the truth principle by hand, and the planted constructions on a tiny
model (a dormant pathway that leaves the task alone and carries an effect only with its null
part; an edit that breaks the task is refused)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SMALL, TINY, end_token_pairs, ld_gradient

from mlpim.analysis import bench_table as T
from mlpim.analysis import benchmark as B
from mlpim.analysis import measure as M
from mlpim.analysis import nullspace as ns
from mlpim.analysis import planted
from mlpim.analysis.editing import edited_w_out
from mlpim.analysis.mlp_write import residual_jacobian
from mlpim.analysis.stats import resample
from mlpim.config import compose
from mlpim.engine.interventions import prepare
from mlpim.engine.patching import subspace
from mlpim.report import bench
from mlpim.tasks import task_splits


@pytest.mark.parametrize(
    "k, n, low, high",
    [(3, 5, 0.1466, 0.9473), (0, 10, 0.0, 0.3085), (0, 8, 0.0, 0.3694), (60, 60, 0.9404, 1.0)],
)
def test_clopper_pearson_matches_the_tables(k, n, low, high):
    """The issue's own numbers (3 of 5: 0.15-0.95; 0 of 10: ≤ 0.31; 0 of 8: ≤ 0.37) and 60/60."""
    lo, hi = T.clopper_pearson(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)
    assert all(math.isnan(x) for x in T.clopper_pearson(0, 0))


def test_gate_position():
    assert T.gate_position(0.21, 0.5, 0.2) == T.ABOVE
    assert T.gate_position(0.19, 0.5, 0.2) == T.HOLDS
    assert T.gate_position(-0.1, 0.19, 0.2) == T.BELOW
    assert T.gate_position(float("nan"), float("nan"), 0.2) == T.HOLDS


def _case(truth, label, gate_pos="above", site="mlp_post", refused=False, score=1.0):
    return {
        "truth": truth,
        "label": label,
        "gate_pos": gate_pos,
        "site": site,
        "kind": "k",
        "refused": refused,
        "score": score,
        "verdict": label,
        "model": "SmolLM2-x",
        "task": "ioi",
        "case": f"c{np.random.rand()}",
        "layer": 1,
        "fldd": 0.5,
        "reason": "",
    }


def test_rates_count_only_mlp_cases_above_the_gate():
    """Holds-the-gate, residual, toy and refused cases are in neither rate."""
    likely, fine = "likely illusory", "no warning signs"
    rows = [_case("illusory", likely)] * 3 + [_case("illusory", fine, score=-1.0)]
    rows += [_case("illusory", fine, gate_pos="holds"), _case("real", likely, gate_pos="holds")]
    rows += [_case("real", fine, score=-2.0)] * 5 + [_case("real", likely, site="resid_post")]
    rows += [_case("real", likely, refused=True), _case("real", likely, site="toy")]
    r = T.rates(pd.DataFrame(rows))
    assert (r["detection"]["k"], r["detection"]["n"]) == (3, 4)
    assert (r["false_positive"]["k"], r["false_positive"]["n"]) == (0, 5)
    assert r["auc"]["value"] == 1.0
    table = T.rates_table(pd.DataFrame(rows))
    assert list(table.task) == ["ioi"] and list(table.split) == ["calibration"]
    more = pd.DataFrame(rows).assign(task="facts")
    table = T.rates_table(pd.concat([pd.DataFrame(rows), more, more.assign(task="pronouns")]))
    assert list(table.task) == ["facts", "ioi", "pronouns", "pooled"]
    assert table.set_index("task").loc["pooled", "detection_n"] == 8  # held-out tasks only
    assert len(T.misses(pd.DataFrame(rows))) == 1
    principle = ["illusory", "real", "illusory", "illusory"] + ["real"] * (len(rows) - 4)
    by_m = T.rates(pd.DataFrame(rows).assign(principle=principle))["detection_m"]
    assert (by_m["k"], by_m["n"]) == (2, 3)  # the principle's illusions among those above


def test_a_miss_says_its_m():
    """A missed illusion's row carries m, so the reader sees when the principle calls it real."""
    row = _case("illusory", "no warning signs") | {"m": 1.3, "principle": "real"}
    assert T.misses(pd.DataFrame([row])).m.tolist() == [1.3]


def test_coverage_counts_near_gate_illusions_and_hard_negatives():
    """Only 1-D MLP cases above the gate count; an illusion at 2x the gate is near it, above is not."""
    likely = "likely illusory"
    ill = [_case("illusory", likely) | {"fldd": f, "gate": 0.2} for f in (0.25, 0.4, 0.41)]
    real = [_case("real", "caution") | {"kind": k, "gate": 0.2} for k in ("hard negative", "edit")]
    off = [_case("illusory", likely, gate_pos="holds") | {"fldd": 0.3, "gate": 0.2}]
    off += [_case("real", "caution", site="resid_post") | {"kind": "hard negative", "gate": 0.2}]
    rows = pd.DataFrame(ill + real + off).assign(task="facts")
    both = pd.concat([rows, rows.assign(task="ioi"), rows.assign(task="pronouns")])
    cov = T.coverage(both).set_index("task")
    assert cov.loc["facts", ["illusions", "near_gate", "real", "hard"]].tolist() == [3, 2, 2, 1]
    assert cov.loc["ioi", "split"] == "calibration"
    assert cov.loc["pooled", "illusions"] == 6  # held-out tasks only
    assert "2/3 = 0.67" in bench.coverage_markdown(rows)


def test_rule_hash_follows_the_frozen_files(tmp_path, monkeypatch):
    """Stable, and changed by an edit of any frozen file (a threshold, a check, the planting)."""
    first = T.rule_hash()
    assert first == T.rule_hash() and len(first) == 12
    for rel in ("conf/check/default.yaml", "analysis/checks/effect.py", "analysis/planted.py"):
        copy = tmp_path / rel.replace("/", "_")
        monkeypatch.setattr(T, "PACKAGE", tmp_path / "pkg")
        target = tmp_path / "pkg" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        original = (T.Path(__file__).resolve().parents[1] / "mlpim" / rel).read_bytes()
        target.write_bytes(original)
        copy.write_bytes(original)
        before = T.rule_hash()
        target.write_bytes(original + b"\n# changed\n")
        assert T.rule_hash() != before
        target.write_bytes(original)
    assert T.split_of("SmolLM2-135M-Instruct", "ioi") == "calibration"
    assert T.split_of("SmolLM2-135M-Instruct", "facts") == "held-out"
    assert T.split_of("gemma-3-270m", "ioi") == "held-out"


def test_read_movement_by_hand():
    """v = c·r + s·n with r read and n not: m = c² + c·s·ρ, ρ the null part's movement along
    the variable over r's; the principle calls m > 2 illusory."""
    w_out = torch.zeros(4, 2, dtype=torch.float64)
    w_out[0, 0] = w_out[1, 1] = 1.0  # reads e0, e1; e2, e3 are its nullspace
    dr = torch.tensor([1.0, -2.0, 3.0, -1.0], dtype=torch.float64)
    moved = torch.zeros(4, 4, dtype=torch.float64)
    moved[:, 0], moved[:, 2] = dr, 3 * dr  # the null direction e2 moves 3× along the variable
    c, s = math.sqrt(0.7), math.sqrt(0.3)
    v = torch.tensor([c, 0.0, s, 0.0], dtype=torch.float64)
    got = planted.read_movement(v, w_out, moved, torch.sign(dr))
    assert got["rho"] == pytest.approx(3.0) and got["null_norm_sq"] == pytest.approx(0.3)
    assert got["m"] == pytest.approx(0.7 + c * s * 3.0)
    assert planted.principle_truth(got["m"]) == "illusory"  # 0.7 + 1.375 > 2
    assert planted.principle_truth(2.01) == "illusory" and planted.principle_truth(1.99) == "real"
    moved[:, 2] = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=torch.float64)  # uncorrelated
    assert planted.read_movement(v, w_out, moved, torch.sign(dr))["m"] == pytest.approx(0.7)
    moved[:, 0] = 0.0  # a read part real prompts do not move: the patch's movement is all excess
    assert planted.read_movement(v, w_out, moved, torch.sign(dr))["m"] == math.inf


def test_null_parts_stay_in_the_nullspace():
    gen = torch.Generator().manual_seed(0)
    w_out = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    v, avoid = (torch.randn(12, generator=gen, dtype=torch.float64) for _ in range(2))
    n = planted.unit_null_part(v, w_out, avoid)
    assert (n @ w_out).abs().max() < 1e-10 and abs(float(n @ avoid)) < 1e-10
    assert float(n.norm()) == pytest.approx(1.0)
    moved = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    r = ns.split(v, w_out)[0]
    z = planted.random_null_direction(w_out, 1)
    u = planted.decorrelated(z, n, moved, r / r.norm())
    dr = moved @ r
    assert abs(float((moved @ u) @ (dr - dr.mean()))) < 1e-8 and (u @ w_out).abs().max() < 1e-10


def test_low_moment_direction_is_dormant_on_held_out_data():
    """Neurons that rarely fire on one sample are still quiet on another: d, on those neurons and
    in W_out's nullspace, sits below the 5th percentile of random directions' variance there,
    and is orthogonal to the mean."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.ones(64, dtype=torch.float64)
    scale[:24] = 1e-3
    sample = lambda: torch.relu(torch.randn(500, 64, generator=gen, dtype=torch.float64)) * scale  # noqa: E731
    train, held = sample(), sample()
    w_out = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    d = planted.low_moment_direction(train, w_out, 8)
    assert abs(float(d @ train.mean(0))) < 1e-10 and float(d.norm()) == pytest.approx(1.0)
    assert (d @ w_out).abs().max() < 1e-10 and d[24:].abs().max() < 1e-12
    assert planted.hidden_percentile(held, d, 1000, 0) < 5.0


def _tiny_site(model, layer: int = 1):
    cfg = compose([*SMALL, "dataset.n_test_pairs=40"])
    pairs = [
        end_token_pairs(model, pb) for pb in task_splits(model.tokenizer, cfg.dataset, 0)["test"]
    ]
    return pairs, ld_gradient(model, pairs, layer)


def test_dormant_pathway_needs_its_null_part_and_leaves_the_task_alone(tiny_gpt2):
    """The edit β·d ⊗ t̂ on a d real prompts do not move leaves the clean LD as it was; in the
    edited model the 45° mix of n and d moves the answer, while d alone and n alone do not, and
    the unedited model's mix does nothing."""
    model, layer = tiny_gpt2, 1
    pairs, target = _tiny_site(model, layer)
    prep = prepare(model, pairs, "mlp_post", layer, "auto")
    base, source = M.acts(prep)
    natural = torch.cat([base, source])
    w = ns.mlp_w_out(model, layer)
    d = planted.low_moment_direction(natural, w, 8).float()
    moved = planted.differences(prep)
    resid = prepare(model, pairs, "resid_post", layer, "auto")
    drive = planted.differences(resid) @ target.double()
    n = planted.unit_null_part(planted.variable_direction(prep), w, d)
    n = planted.oriented_by(n, moved, drive).float()
    beta = planted.pathway_beta(moved @ n.double(), float(drive.abs().mean()), 0.5)
    idx = resample(40, 200, 0)
    fldd = lambda p, v: M.pair_lds(model, p, subspace(v[:, None])).fldd(idx).value  # noqa: E731
    mix = planted.mix(n, d, 45.0)
    assert abs(fldd(prep, mix)) < 0.05
    clean = torch.cat([p.clean_ld for p in prep]).mean()
    with edited_w_out(model, layer, planted.edit_delta(d, target, beta)):
        edited = prepare(model, pairs, "mlp_post", layer, "auto")
        ratio = float(torch.cat([p.clean_ld for p in edited]).mean() / clean)
        f_mix, f_d, f_n = fldd(edited, mix), fldd(edited, d), fldd(edited, n)
    assert ratio == pytest.approx(1.0, abs=0.05)
    assert f_mix > 0.3 and abs(f_d) < 0.2 * f_mix and abs(f_n) < 1e-4  # measured 0.94, 0.09, 0
    assert planted.hidden_percentile(natural, d, 1000, 0) < 5.0


def test_an_edit_that_breaks_the_task_is_refused(tiny_gpt2):
    """in_edit measures nothing in a model whose clean LD the edit drove below half."""
    model, layer = tiny_gpt2, 1
    pairs, target = _tiny_site(model, layer)
    prep = prepare(model, pairs, "mlp_post", layer, "auto")
    u = M.acts(prep)[0].mean(0)  # every base prompt reads it: the edit moves every clean LD
    clean = float(torch.cat([p.clean_ld for p in prep]).double().mean())
    delta = planted.edit_delta(u / u.norm(), -target, 1e3)  # writes hard against the answer
    opts = B.BenchOptions((), (), (), (), (), (), 4, 0, 0, 1.0, 0)
    ctx = B.Layer(
        model,
        layer,
        {"train": pairs, "test": pairs},
        None,
        target,
        1.0,
        torch.zeros(1),
        clean,
        None,
        None,
        opts,
        "auto",
        None,
        B.pair_writes(model, layer, pairs),
    )
    called = []
    _, rows = B.in_edit(ctx, delta, "bad edit", "edit", 7, lambda site: called.append(1))
    assert not called and rows[0]["refused"] and rows[0]["n_cases"] == 7
    assert rows[0]["clean_ratio"] < 0.5 and rows[0]["edit_write"] > 0


def _post_norm_model(layer: int):
    """A tiny Gemma 3 whose post-feedforward norm has a large, uneven gain, as trained ones have
    (positive, ~20 ± 3; Gemma 3 270M's reaches ~3·10³ at layer 10)."""
    from mlpim.experiments.common import model_for

    model = model_for(compose(["model=tiny", "model.arch=gemma3", "device=cpu"]))
    with torch.no_grad():
        for p in model.blocks[layer].ln2_post.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 3 + 20)
    return model


def test_behind_a_post_norm_an_edit_writes_its_strength_into_the_residual():
    """An edit sized in the residual's units but written before Gemma's post-feedforward norm
    misses its strength; built through the norm's Jacobian (`residual_jacobian`), it writes
    α (h·u) along t̂, measured through the model's own forward (`edit_write`), to first order."""
    layer, strength = 1, 0.2
    model = _post_norm_model(layer)
    pairs, target = _tiny_site(model, layer)
    t = target.double() / target.double().norm()
    prep = prepare(model, pairs, "mlp_post", layer, "auto")
    resid = prepare(model, pairs, "resid_post", layer, "auto")
    gap = float((planted.differences(resid) @ t).abs().mean())
    u = planted.variable_direction(prep)
    jac = residual_jacobian(model, layer, [p.base for p in pairs[:2]])
    writes = B.pair_writes(model, layer, pairs)
    ctx = B.Layer(
        model,
        layer,
        {"train": pairs},
        None,
        t,
        gap,
        None,
        1.0,
        None,
        None,
        None,
        "auto",
        jac,
        writes,
    )
    alpha = planted.edit_alpha(prep, u, gap, strength)
    measured = {}
    for through in (jac, None):
        with edited_w_out(model, layer, planted.edit_delta(u, t, alpha, through)):
            measured[through is None] = B.edit_write(ctx)
    assert jac is not None and measured[False] == pytest.approx(strength, rel=0.1)
    assert abs(measured[True] - strength) > 2 * strength  # measured 0.184 and 1.21


def test_without_a_post_norm_the_edit_is_u_times_the_unit_target(tiny_llama):
    """Where the block adds the MLP's output as it is, there is no Jacobian and the edit is
    α u ⊗ t̂ exactly."""
    pairs, target = _tiny_site(tiny_llama, 1)
    assert residual_jacobian(tiny_llama, 1, [p.base for p in pairs[:2]]) is None
    u = torch.randn(tiny_llama.cfg.d_mlp, dtype=torch.float64)
    t = target.double() / target.double().norm()
    assert torch.equal(planted.edit_delta(u, target, 2.0), 2.0 * torch.outer(u, t))


def _script():
    import importlib.util

    path = T.Path(__file__).resolve().parents[1] / "scripts" / "verdict_bench.py"
    spec = importlib.util.spec_from_file_location("verdict_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the tiny model's benchmark at one layer, as few references as still measure each check
BENCH_TINY = [
    "dataset.n_train_pairs=20",
    "method.epochs=1",
    "extra.bench_layer_offsets=[0]",
    "extra.bench_toy=false",
    "extra.reference_cache=null",
    "extra.n_random_directions=2",
    "extra.n_natural=0",
    "extra.n_natural_prompts=100",
    "extra.pathway_angles=[45]",
    "extra.bench_angles=[45]",
]
ONE_EACH = ["extra.pathway_strengths=[1.0]", "extra.edit_strengths=[1.0]", "extra.null_norms=[0.3]"]


def test_verdict_bench_runs_parts_resumes_and_merges(tmp_path, capsys):
    """Two parts (IOI, pronouns) on the tiny model, merged into one report with one row per
    task; a second call skips both finished parts and rewrites the same report."""
    vb = _script()
    argv = [
        "--models",
        "tiny",
        "--tasks",
        "ioi,pronouns",
        "--out",
        str(tmp_path),
        "device=cpu",
        *BENCH_TINY,
        *ONE_EACH,
    ]
    vb.main(argv)
    text = (tmp_path / "REPORT.md").read_text()
    assert "tiny-ioi" in text and "tiny-pronouns" in text and T.rule_hash() in text
    merged = pd.read_csv(tmp_path / "cases.csv")
    assert set(merged.task) == {"ioi", "pronouns"} and set(merged.seed) == {0}
    assert "| pooled | held-out |" in text  # tiny × both tasks: held-out, pooled under one hash
    assert "Wall time per model: tiny " in text and " over 2 parts." in text
    assert (tmp_path / "roc.png").exists() and (tmp_path / "scores.png").exists()
    capsys.readouterr()
    vb.main(argv)
    assert capsys.readouterr().out.count("skipped") == 2
    assert (tmp_path / "REPORT.md").read_text() == text
    other = tmp_path / "tiny-pronouns" / "cases.csv"  # as if made under another rule
    pd.read_csv(other).assign(rule="b" * 12).to_csv(other, index=False)
    vb.main(["--report-only", "--out", str(tmp_path)])
    text = (tmp_path / "REPORT.md").read_text()
    assert f"## Rule hash {T.rule_hash()}" in text and f"## Rule hash {'b' * 12}" in text
    assert "| pooled | held-out |" not in text  # one task per hash: nothing pooled across hashes
    for rule in (T.rule_hash(), "b" * 12):
        assert (tmp_path / f"rule-{rule}" / "roc.png").exists()


def test_a_case_two_parts_measured_counts_once():
    """A part re-run with other sweeps repeats its unedited cases: the merged table keeps one row
    per case (a part without a seed column ran seed 0); repeats with other verdicts stop the
    report with one line; another layer or seed is another case."""
    row = dict(model="m", task="t", rule="r", layer=3, site="mlp_post", verdict="no warning signs")
    first = pd.DataFrame([{**row, "case": "unedited read part"}, {**row, "case": "edit ×0.5"}])
    second = pd.DataFrame([{**row, "case": "unedited read part"}, {**row, "case": "edit ×0.2"}])
    vb = _script()
    kept = vb.once(pd.concat([first, second], ignore_index=True))
    assert list(kept.case) == ["unedited read part", "edit ×0.5", "edit ×0.2"]
    other = second.assign(verdict="likely illusory")
    with pytest.raises(SystemExit, match="other verdicts: unedited read part"):
        vb.once(pd.concat([first, other], ignore_index=True))
    for elsewhere in (second.assign(layer=7), second.assign(seed=1)):  # other cases
        assert len(vb.once(pd.concat([first, elsewhere], ignore_index=True))) == 4


def _tiny_cases(tmp_path, name: str, strengths: str, edits: str, norms: str) -> pd.DataFrame:
    """The tiny model's IOI benchmark cases with these sweeps (every other option fixed)."""
    from mlpim.run import run

    sweeps = [
        f"extra.pathway_strengths={strengths}",
        f"extra.edit_strengths={edits}",
        f"extra.null_norms={norms}",
    ]
    cfg = compose(
        ["experiment=illusion_benchmark", *TINY, *BENCH_TINY, "extra.bench_k=[2]", *sweeps]
    )
    run(cfg, tmp_path / name)
    return pd.read_csv(tmp_path / name / "cases.csv").set_index("case")


def test_a_subset_of_cases_rerun_alone_gives_the_same_verdicts(tmp_path):
    """Issue 30: re-running a few cases with the same seed (a narrower sweep) gives each shared
    case the same verdict, score and effect as the full run: no case depends on the others."""
    full = _tiny_cases(tmp_path, "full", "[0.5,1.0]", "[0.5,1.0]", "[0.1,0.3]")
    some = _tiny_cases(tmp_path, "some", "[1.0]", "[1.0]", "[0.3]")
    assert len(some) < len(full) and set(some.index) <= set(full.index)
    shared = full.loc[some.index]
    assert (shared.verdict == some.verdict).all()
    assert np.allclose(shared.score, some.score, equal_nan=True)
    assert np.allclose(shared.fldd, some.fldd, equal_nan=True)
