"""illusion_check: the checks flag a planted illusory direction in a hand-built model while passing
a planted real one; the thresholds on the paper's numbers; the runner end to end on `model=tiny`."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from mlpim import constants as C
from mlpim.analysis import illusion
from mlpim.analysis import nullspace as ns
from mlpim.analysis.controls import intervention_bases
from mlpim.config import compose
from mlpim.engine.models import ConfigError
from mlpim.engine.patching import full, subspace
from mlpim.engine.subspace import save_subspace
from mlpim.experiments.illusion_check import PLOT
from mlpim.run import run

torch.set_num_threads(1)
FAST = ["model=tiny", "device=cpu", "dataset.n_train_pairs=40", "dataset.n_test_pairs=20"]
DT = torch.float64

# Hand-built MLP: inputs x (the feature) and n (nuisance) in {-1, 1}; hidden h = (x, x+n, 0, n):
# e1 real (read into the answer), e2 irrelevant (varies with x, never read), e3 dormant (read,
# never active), e4 other. W_out rows (hidden -> 3 outputs); the answer is output 0.
W_OUT = torch.tensor([[1, 0, 0], [0, 0, 0], [2, 1, 0], [0, 0, 1]], dtype=DT)
E = torch.eye(4, dtype=DT)
V_ILLUSORY = (E[1] + E[2]) / math.sqrt(2)


def hidden(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return torch.stack([x, x + n, torch.zeros_like(x), n], dim=1)


def hand_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Base and source hidden acts: opposite x, every combination of the two nuisances."""
    signs = (1.0, -1.0)
    combos = torch.tensor([(x, a, b) for x in signs for a in signs for b in signs], dtype=DT)
    x, n_base, n_source = combos.T
    return hidden(x, n_base), hidden(-x, n_source)


def effect(setter) -> float:
    """FLDD analogue: mean over pairs of (y0_patched − y0_base) / (y0_source − y0_base)."""
    base, source = hand_pairs()
    y0 = lambda h: (h @ W_OUT)[:, 0]  # noqa: E731
    return ((y0(setter(base, source)) - y0(base)) / (y0(source) - y0(base))).mean().item()


def hand_checks(v: torch.Tensor) -> tuple[dict[str, float], list[illusion.Check]]:
    """Patch effects along v, its parts (the runner's bases) and the whole layer; checks 1-3."""
    proj, null = ns.split(v, W_OUT)
    fldd = {name: effect(subspace(b)) for name, b in intervention_bases(v, proj, null).items()}
    fldd["full"] = effect(full)
    return fldd, illusion.mlp_checks(fldd, v, W_OUT, *hand_pairs())


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
    warned = {c.name for c in checks if c.warning}
    assert warned == {"nullspace_bridging", "dormant_row_part"}
    assert math.isinf(checks[2].value)  # the dormant neuron never moves on real prompts
    assert illusion.verdict(checks) == (2, "likely illusory")


def test_passes_planted_real_direction():
    fldd, checks = hand_checks(E[0])
    assert fldd["das"] == pytest.approx(1.0) and "null_proj" not in fldd
    assert [c.warning for c in checks] == [False, False, False]
    assert checks[2].value == pytest.approx(1.0)  # patch moves e1 exactly as the prompts do
    assert illusion.verdict(checks) == (0, "no warning signs")


def test_thresholds_on_the_paper_numbers():
    """GPT-2 MLP8 (Table 1): v_MLP 0.467, full −0.08, row part 0.135, null part 0, ‖null‖ 0.657."""
    assert illusion.component_check(0.467, -0.08).warning
    assert illusion.nullspace_check(0.467, 0.135, 0.0, 0.657**2).warning
    assert not illusion.component_check(1.407, 1.236).warning  # v_resid vs full resid_post8
    assert not illusion.nullspace_check(0.467, 0.40, 0.0, 0.5).warning  # additive: row explains it
    assert not illusion.component_check(0.1, -0.5).warning  # no effect to explain
    assert illusion.random_mlp_check(0.5, 0.467).warning
    assert not illusion.random_mlp_check(0.05, 0.467).warning
    assert illusion.dormant_check(2.0).warning and not illusion.dormant_check(1.2).warning


def test_verdict_table_words():
    checks = [
        illusion.component_check(0.467, -0.08),
        illusion.nullspace_check(0.467, 0.4, 0.0, 0.5),
        illusion.not_applicable("dormant_row_part", "why"),
        illusion.Check("alignment", 0.5, 0.1, None, "information only"),
    ]
    table = illusion.verdict_table(checks)
    assert list(table.warning) == ["yes", "no", "n.a.", "info", "caution"]
    assert table.loc["verdict", "value"] == 1.0
    assert list(table.columns) == [
        "value", "threshold", "margin", "spread", "reference", "percentile", "z", "warning",
        "meaning",
    ]  # fmt: skip
    assert table.loc["component_vs_subspace", "margin"] == pytest.approx(0.3135)


@pytest.fixture(scope="module")
def directions(tmp_path_factory) -> dict[str, str]:
    """A tiny 1-D DAS direction at mlp_post L1 and a mean-difference one at resid_post L1."""
    out = tmp_path_factory.mktemp("directions")
    run(compose(["experiment=ioi_mlp8_das", *FAST, "method.epochs=2"]), out / "mlp")
    run(compose(["experiment=ioi_mean_diff", *FAST]), out / "resid")
    return {k: str(out / k / C.DIRECTION) for k in ("mlp", "resid")}


def test_illusion_check_end_to_end_mlp(directions, tmp_path):
    overrides = [f"direction={directions['mlp']}", f"extra.resid_direction={directions['resid']}",
                 "method.epochs=2", "extra.random_mlp_epochs=1", "extra.n_random=200",
                 "extra.random_mlp_seeds=2", "extra.n_random_directions=8", "extra.n_natural=3"]  # fmt: skip
    df = run(compose(["experiment=illusion_check", *FAST, *overrides]), tmp_path)
    assert {"das", "full", "row_proj", "null_proj", "random_mlp", "verdict"} <= set(df.intervention)
    for name in (C.METRICS, C.VERDICT, C.SUMMARY, PLOT, "history_random_mlp_seed0.csv"):
        assert (tmp_path / name).exists(), name
    saved = pd.read_csv(tmp_path / C.METRICS)
    checks = saved[saved.metric == "check_value"].set_index("intervention").value
    assert set(checks.index) == set(illusion.CHECKS) and checks.notna().all()
    for metric in ("margin", "percentile", "z", "borderline"):
        assert metric in set(saved.metric), metric
    text = (tmp_path / C.VERDICT).read_text()
    assert all(name in text for name in illusion.CHECKS)
    from mlpim.experiments.illusion_check import summarize

    table = summarize(df)
    assert list(table.index) == [*illusion.CHECKS, "verdict"]
    assert table.loc["alignment", "warning"] == "info"
    word = table.loc["verdict", "warning"]
    if table.loc["effect", "value"] < table.loc["effect", "threshold"]:  # below the gate
        assert word.startswith(illusion.NO_EFFECT) and "likely illusory" not in word, word
    else:
        assert word in (*illusion.VERDICTS.values(), "likely illusory") or word.startswith(
            "borderline"
        )


def test_illusion_check_residual_site(directions, tmp_path):
    overrides = [f"direction={directions['resid']}", "extra.n_random_directions=4"]
    df = run(compose(["experiment=illusion_check", *FAST, *overrides]), tmp_path)
    assert set(df.site) == {"resid_post"} and "row_proj" not in set(df.intervention)
    from mlpim.experiments.illusion_check import summarize

    table = summarize(df)
    assert table.loc["component_vs_subspace", "warning"] in ("yes", "no")
    mlp_only = ["nullspace_bridging", "dormant_row_part", "alignment", "random_mlp"]
    assert (table.loc[mlp_only, "warning"] == "n.a.").all()
    assert table.loc["effect", "warning"] == "info"
    assert table.loc["generalisation", "warning"].split(",")[0] in ("yes", "no")


def test_illusion_check_refuses_bad_directions(directions, tmp_path):
    with pytest.raises(ConfigError, match="direction="):
        run(compose(["experiment=illusion_check", *FAST]), tmp_path / "missing")
    narrow = tmp_path / "narrow.pt"
    save_subspace(narrow, torch.eye(32)[:, :1], model="tiny", site="mlp_post", layer=1, k=1)
    with pytest.raises(ConfigError, match="width 32"):
        run(compose(["experiment=illusion_check", *FAST, f"direction={narrow}"]), tmp_path / "w")
    two = tmp_path / "two.pt"
    save_subspace(two, torch.eye(128)[:, :2], model="tiny", site="mlp_post", layer=1, k=2)
    with pytest.raises(ConfigError, match="2-D"):
        run(compose(["experiment=illusion_check", *FAST, f"direction={two}"]), tmp_path / "k")
    with pytest.raises(ConfigError, match="resid"):  # an MLP direction as the reference
        overrides = [f"direction={directions['mlp']}",
                     f"extra.resid_direction={directions['mlp']}"]  # fmt: skip
        run(compose(["experiment=illusion_check", *FAST, *overrides]), tmp_path / "r")
