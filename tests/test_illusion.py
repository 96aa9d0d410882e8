"""illusion_check: the rule on hand-built MLPs (a planted illusion flagged, a real direction passed
even where the whole component does nothing), the gate and its symmetric borderline, the
thresholds on the paper's numbers, and the runner end to end on `model=tiny`."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SMALL

from mlpim import constants as C
from mlpim.analysis import divergence, illusion
from mlpim.analysis import nullspace as ns
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.checks.base import not_applicable
from mlpim.analysis.checks.component_vs_subspace import component_check
from mlpim.analysis.checks.dormant_row_part import dormant_check
from mlpim.analysis.checks.effect import effect_check
from mlpim.analysis.checks.generalisation import generalisation_check
from mlpim.analysis.checks.nullspace_bridging import nullspace_check
from mlpim.analysis.checks.off_distribution import off_distribution_check
from mlpim.analysis.checks.random_mlp import random_mlp_check
from mlpim.analysis.controls import intervention_bases
from mlpim.analysis.references import Reference, Refs
from mlpim.analysis.stats import Est, resample
from mlpim.config import compose
from mlpim.engine.models import ConfigError
from mlpim.engine.patching import full, subspace
from mlpim.engine.subspace import save_subspace
from mlpim.experiments.illusion_check import PLOT
from mlpim.run import run

SMALL_REFS = [*SMALL, "extra.reference_cache=null", "extra.n_natural_prompts=100"]
DT = torch.float64
TH = Thresholds.from_mapping(compose([]).check)
NO_REFS = Refs()

# Hand-built MLP: inputs x (the feature) and n (nuisance) in {-1, 1}; hidden h = (x, x+n, 0, n):
# e1 real (read into the answer), e2 irrelevant (varies with x, never read), e3 dormant (read,
# never active), e4 other. W_out rows (hidden -> 3 outputs); the answer is output 0.
W_OUT = torch.tensor([[1, 0, 0], [0, 0, 0], [2, 1, 0], [0, 0, 1]], dtype=DT)
E = torch.eye(4, dtype=DT)
V_ILLUSORY = (E[1] + E[2]) / math.sqrt(2)
# A second MLP whose whole patch does nothing: h = (x, x), e1 writes +x to output 0 (the answer),
# e2 writes −x to output 1, which also counts in the answer (answer = output 0 + output 1).
W_CANCEL = torch.tensor([[1, 0], [0, -1]], dtype=DT)


def hidden(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return torch.stack([x, x + n, torch.zeros_like(x), n], dim=1)


def hand_pairs(make=hidden) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and source hidden acts: opposite x, every combination of the two nuisances."""
    signs = (1.0, -1.0)
    combos = torch.tensor([(x, a, b) for x in signs for a in signs for b in signs], dtype=DT)
    x, n_base, n_source = combos.T
    return make(x, n_base), make(-x, n_source)


def cancel_hidden(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return torch.stack([x, x], dim=1)


def hand_checks(v: torch.Tensor, w_out=W_OUT, make=hidden, read=None, rest=0.0) -> tuple:
    """Patch effects along v, its parts and the whole layer; the gate and the MLP checks. The
    answer is read(MLP output) plus `rest` × x (the rest of the network carrying x too)."""
    read = read or (lambda y: y[:, 0])
    base, source = hand_pairs(make)
    x_b, x_s = base[:, 0], source[:, 0]
    answer = lambda h, x: read(h @ w_out) + rest * x  # noqa: E731

    def effect(setter) -> float:
        moved = answer(setter(base, source), x_b) - answer(base, x_b)
        return (moved / (answer(source, x_s) - answer(base, x_b))).mean().item()

    proj, null = ns.split(v, w_out)
    fldd = {name: effect(subspace(b)) for name, b in intervention_bases(v, proj, null).items()}
    fldd["full"] = effect(full)
    idx, nat_idx = resample(len(base), 200, 0), resample(2 * len(base), 200, 1)
    off, full_off = divergence.off_distribution(
        base, source, v, w_out, torch.cat([base, source]), idx, nat_idx
    )
    checks = [
        effect_check(fldd["das"], NO_REFS, TH),
        component_check(fldd["das"], fldd["full"], TH),
        nullspace_check(
            fldd["das"], fldd.get("row_proj", 0.0), null.norm().item() ** 2, NO_REFS, TH
        ),
        dormant_check(divergence.dormant_est(base, source, v, proj, idx), NO_REFS, TH),
        off_distribution_check(off, full_off, NO_REFS, TH),
    ]
    return fldd, checks


def by_name(checks) -> dict[str, illusion.Check]:
    return {c.name: c for c in checks}


def test_hand_built_patches():
    """Along v the answer flips as along e1, yet each part of v alone does nothing."""
    fldd, _ = hand_checks(V_ILLUSORY)
    assert fldd["das"] == pytest.approx(1.0)
    assert fldd["row_proj"] == pytest.approx(0.0, abs=1e-12)  # e3: never differs between prompts
    assert fldd["null_proj"] == pytest.approx(0.0, abs=1e-12)  # e2: never read
    assert fldd["full"] == pytest.approx(1.0)
    proj, null = ns.split(V_ILLUSORY, W_OUT)
    torch.testing.assert_close(proj, E[2] / math.sqrt(2))
    torch.testing.assert_close(null, E[1] / math.sqrt(2))


def test_flags_planted_illusory_direction():
    _, checks = hand_checks(V_ILLUSORY)
    c = by_name(checks)
    assert c["nullspace_bridging"].warning and c["dormant_row_part"].warning
    assert math.isinf(c["dormant_row_part"].value)  # the dormant neuron never moves on real prompts
    v = illusion.verdict(checks)
    assert v.label == illusion.LIKELY_ILLUSORY
    assert {"nullspace_bridging", "dormant_row_part"} <= set(v.warned)
    assert "component_vs_subspace" not in v.warned  # site checks never count as direction ones
    assert illusion.illusion_score(checks) > 0


def test_passes_planted_real_direction():
    fldd, checks = hand_checks(E[0])
    assert fldd["das"] == pytest.approx(1.0) and "null_proj" not in fldd
    c = by_name(checks)
    assert not any(c[n].warning for n in illusion.DIRECTION if n in c)
    assert c["dormant_row_part"].value == pytest.approx(1.0)  # moves e1 as far as prompts do
    assert c["off_distribution"].value < 0.5  # the patched output is a real prompt's output
    assert illusion.verdict(checks).label == illusion.NO_WARNING
    assert illusion.illusion_score(checks) < 0


def test_real_direction_where_the_whole_component_does_nothing():
    """The combination rule: a real direction at a site whose whole-component patch does nothing
    (two real neurons cancel in the answer) gets no "likely illusory": site checks never decide."""
    read = lambda y: y[:, 0] + y[:, 1]  # noqa: E731
    e1 = torch.tensor([1.0, 0.0], dtype=DT)
    fldd, checks = hand_checks(e1, W_CANCEL, cancel_hidden, read, rest=1.0)
    assert fldd["das"] == pytest.approx(1.0) and fldd["full"] == pytest.approx(0.0, abs=1e-12)
    c = by_name(checks)
    assert c["component_vs_subspace"].warning  # the site note fires ...
    v = illusion.verdict(checks)
    assert v.site_notes == ("component_vs_subspace",) and v.warned == ()
    assert v.label == illusion.NO_WARNING  # ... and the verdict stays on the direction's evidence


def est(value: float, lo: float, hi: float) -> Est:
    """An estimate whose replicates spread evenly over [lo, hi]."""
    return Est(value, np.linspace(lo, hi, 201))


def test_gate_below_is_no_effect_and_borderline_is_symmetric():
    """Below the gate: "no effect to explain", firm when the interval is below it; an interval
    holding the gate reads borderline on either side of it, with what the checks would say."""
    _, checks = hand_checks(V_ILLUSORY)
    rest = checks[1:]
    low = [effect_check(est(0.10, 0.05, 0.15), NO_REFS, TH), *rest]
    assert illusion.verdict(low).label == "no effect to explain (FLDD 0.100 below the gate 0.200)"
    assert illusion.verdict(low).klass == illusion.NO_EFFECT
    assert by_name(low)["nullspace_bridging"].warning  # still shown: it would warn above the gate
    for value in (0.199, 0.201):
        close = [effect_check(est(value, 0.15, 0.25), NO_REFS, TH), *rest]
        v = illusion.verdict(close)
        assert v.label == "borderline: no effect to explain or likely illusory", value
        assert v.klass == illusion.BORDERLINE


def test_borderline_warning_from_its_interval():
    """A warning whose interval holds its threshold makes the verdict borderline."""
    _, checks = hand_checks(V_ILLUSORY)
    dormant = dormant_check(est(2.2, 1.8, 2.6), NO_REFS, TH)
    assert dormant.warning and dormant.borderline
    assert illusion.warning_word(dormant) == "yes, borderline"
    c = by_name(checks) | {"dormant_row_part": dormant}
    c["off_distribution"] = off_distribution_check(0.2, 0.0, NO_REFS, TH)
    v = illusion.verdict(list(c.values()))
    assert v.label == "borderline: caution or likely illusory"
    firm = dormant_check(est(3.0, 2.6, 3.4), NO_REFS, TH)
    assert illusion.verdict(list((c | {"dormant_row_part": firm}).values())).label == (
        illusion.LIKELY_ILLUSORY
    )


def test_thresholds_on_the_paper_numbers():
    """GPT-2 MLP8 (Table 1): v_MLP 0.467, full −0.08, row part 0.135, null part 0, ‖null‖ 0.657."""
    assert component_check(0.467, -0.08, TH).warning
    assert nullspace_check(0.467, 0.135, 0.657**2, NO_REFS, TH).warning
    assert not component_check(1.407, 1.236, TH).warning  # v_resid vs full resid_post8
    assert not nullspace_check(0.467, 0.40, 0.5, NO_REFS, TH).warning  # its read part's own
    assert not nullspace_check(0.467, 0.1, 0.05, NO_REFS, TH).warning  # no null part
    assert random_mlp_check(0.5, 0.467, NO_REFS, TH).warning
    assert not random_mlp_check(0.05, 0.467, NO_REFS, TH).warning
    assert dormant_check(2.0, NO_REFS, TH).warning
    assert not dormant_check(1.2, NO_REFS, TH).warning


def test_generalisation_check():
    assert generalisation_check(0.6, 0.2, TH).warning
    assert not generalisation_check(0.6, 0.5, TH).warning
    held = {"test": 0.55, "new templates": 0.25, "new names": 0.5}
    check = generalisation_check(0.6, held, TH)
    assert check.warning and check.value == pytest.approx(0.25 / 0.6)
    assert "lowest: new templates" in check.detail
    assert not generalisation_check(0.6, {**held, "new templates": 0.4}, TH).warning
    alone = [effect_check(0.6, NO_REFS, TH), check]
    assert illusion.verdict(alone).label == illusion.CAUTION  # never likely illusory on its own


def test_effect_gate_from_random_directions():
    refs = Refs(random_dirs=Reference("r", tuple(0.3 + 0.01 * i for i in range(10))))
    e = effect_check(0.25, refs, TH)
    assert e.threshold == pytest.approx(refs.random_dirs.quantile(0.99))
    assert illusion.gate_of([e]).ok is False
    assert illusion.gate_of([effect_check(0.25, NO_REFS, TH)]).ok  # min_effect 0.2 alone


def test_verdict_table_words():
    _, checks = hand_checks(V_ILLUSORY)
    checks = [*checks, not_applicable("alignment", "why")]
    table = illusion.verdict_table(checks)
    assert table.loc["effect", "warning"] == "info"
    assert table.loc["alignment", "warning"] == "n.a."
    assert table.loc["nullspace_bridging", "scope"] == "direction"
    assert table.loc["component_vs_subspace", "scope"] == "site"
    assert table.loc["verdict", "warning"] == illusion.LIKELY_ILLUSORY


@pytest.fixture(scope="module")
def directions(tmp_path_factory) -> dict[str, str]:
    """A tiny 1-D DAS direction at mlp_post L1 and a mean-difference one at resid_post L1."""
    out = tmp_path_factory.mktemp("directions")
    run(compose(["experiment=ioi_mlp8_das", *SMALL, "method.epochs=2"]), out / "mlp")
    run(compose(["experiment=ioi_mean_diff", *SMALL]), out / "resid")
    return {k: str(out / k / C.DIRECTION) for k in ("mlp", "resid")}


CHECK_FAST = [
    "method.epochs=2",
    "extra.n_random=200",
    "extra.random_mlp_seeds=2",
    "extra.n_random_directions=8",
    "extra.n_natural=3",
]


def test_illusion_check_end_to_end_mlp(directions, tmp_path):
    overrides = [f"direction={directions['mlp']}", f"extra.resid_direction={directions['resid']}"]
    df = run(compose(["experiment=illusion_check", *SMALL_REFS, *CHECK_FAST, *overrides]), tmp_path)
    assert {"das", "full", "row_proj", "null_proj", "verdict"} <= set(df.intervention)
    for name in (C.METRICS, C.VERDICT, C.SUMMARY, PLOT, "history_random_mlp_seed1.csv"):
        assert (tmp_path / name).exists(), name
    saved = pd.read_csv(tmp_path / C.METRICS)
    checks = saved[saved.metric == "check_value"].set_index("intervention").value
    assert set(checks.index) == set(illusion.CHECKS) and checks.notna().all()
    for metric in ("margin_low", "margin_high", "value_low", "percentile", "borderline"):
        assert metric in set(saved.metric), metric
    text = (tmp_path / C.VERDICT).read_text()
    assert all(name in text for name in illusion.CHECKS)
    from mlpim.experiments.illusion_check import summarize

    table = summarize(df)
    assert list(table.index) == [*illusion.CHECKS, "verdict"]
    assert table.loc["alignment", "warning"] == "info"
    word = table.loc["verdict", "warning"]
    assert word.split(" (")[0] in illusion.LABELS or word.startswith("borderline")


def test_a_second_check_reads_its_site_from_the_activation_cache(directions, tmp_path, caplog):
    """`extra.activation_cache`: a second check reads the site's prepared pairs, natural
    activations and references from disk and writes the same metrics; a kept entry that no
    longer agrees with the model is recomputed, with a warning, and changes no number."""
    cache = tmp_path / "cache"
    args = ["experiment=illusion_check", *SMALL_REFS, *CHECK_FAST]
    args += [f"direction={directions['mlp']}", f"extra.activation_cache={cache}"]
    run(compose(args), tmp_path / "cold")
    kinds = {"prepare", "natural", "random_dirs", "natural_refs"}
    assert {p.parent.name for p in cache.rglob("*.pt")} == kinds
    metrics = lambda name: (tmp_path / name / C.METRICS).read_text().replace(name, "X")  # noqa: E731
    with caplog.at_level(logging.INFO, logger="mlpim.reuse"):
        run(compose(args), tmp_path / "warm")
    read = {r.getMessage().split()[0] for r in caplog.records if "read from the cache" in r.message}
    assert read == kinds and metrics("warm") == metrics("cold")
    entry = next((cache / "prepare").glob("*.pt"))
    kept = torch.load(entry, weights_only=False)
    kept[0].clean_logits[0] += 1.0  # no longer what the model computes
    torch.save(kept, entry)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlpim.reuse"):
        run(compose(args), tmp_path / "stale")
    assert any("differs from what this model computes" in r.message for r in caplog.records)
    assert metrics("stale") == metrics("cold")


def test_illusion_check_residual_site(directions, tmp_path):
    overrides = [f"direction={directions['resid']}", "extra.n_random_directions=4"]
    df = run(compose(["experiment=illusion_check", *SMALL_REFS, *overrides]), tmp_path)
    assert set(df.site) == {"resid_post"} and "row_proj" not in set(df.intervention)
    from mlpim.experiments.illusion_check import summarize

    table = summarize(df)
    assert table.loc["component_vs_subspace", "warning"].split(",")[0] in ("yes", "no")
    mlp_only = [
        "nullspace_bridging",
        "dormant_row_part",
        "off_distribution",
        "alignment",
        "random_mlp",
    ]
    assert (table.loc[mlp_only, "warning"] == "n.a.").all()
    assert table.loc["effect", "warning"] == "info"
    assert table.loc["generalisation", "warning"].split(",")[0] in ("yes", "no")


def test_illusion_check_refuses_bad_directions(directions, tmp_path):
    with pytest.raises(ConfigError, match="direction="):
        run(compose(["experiment=illusion_check", *SMALL_REFS]), tmp_path / "missing")
    narrow = tmp_path / "narrow.pt"
    save_subspace(narrow, torch.eye(32)[:, :1], model="tiny", site="mlp_post", layer=1, k=1)
    with pytest.raises(ConfigError, match="width 32"):
        run(
            compose(["experiment=illusion_check", *SMALL_REFS, f"direction={narrow}"]),
            tmp_path / "w",
        )
    many = tmp_path / "many.pt"  # more dimensions than it checks whole (issue 31)
    save_subspace(many, torch.eye(128)[:, :17], model="tiny", site="mlp_post", layer=1, k=17)
    with pytest.raises(ConfigError, match="17-D subspace.*at most 16 dimensions"):
        run(
            compose(["experiment=illusion_check", *SMALL_REFS, f"direction={many}"]), tmp_path / "k"
        )
    two = tmp_path / "two.pt"  # the alignment's reference is one residual direction
    save_subspace(two, torch.eye(64)[:, :2], model="tiny", site="resid_post", layer=1, k=2)
    with pytest.raises(ConfigError, match="extra.resid_direction=.*2-D subspace"):
        overrides = [f"direction={directions['mlp']}", f"extra.resid_direction={two}"]
        run(compose(["experiment=illusion_check", *SMALL_REFS, *overrides]), tmp_path / "two")
    with pytest.raises(ConfigError, match="resid"):  # an MLP direction as the reference
        overrides = [f"direction={directions['mlp']}", f"extra.resid_direction={directions['mlp']}"]
        run(compose(["experiment=illusion_check", *SMALL_REFS, *overrides]), tmp_path / "r")
