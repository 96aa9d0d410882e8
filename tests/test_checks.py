"""The registry of checks (mlpim.analysis.checks) drives the config, the names and the verdict."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import SMALL
from omegaconf import OmegaConf

from mlpim import constants as C
from mlpim.analysis import checks, illusion
from mlpim.analysis.checks.base import SPECS, Spec, Threshold, register
from mlpim.config import CONF_DIR, CheckConfig, compose
from mlpim.errors import ConfigError
from mlpim.experiments import illusion_check as runner
from mlpim.run import run


def test_registry_thresholds_are_the_config_and_its_defaults():
    names = [t.name for t in checks.THRESHOLDS]
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "check" / "default.yaml"))
    assert [f.name for f in dataclasses.fields(CheckConfig)] == names == list(defaults)
    assert [f.name for f in dataclasses.fields(checks.Thresholds)] == names
    for t in checks.THRESHOLDS:
        assert type(defaults[t.name]) is t.kind, t.name  # `2` for a float would refuse `2.5`
    th = checks.Thresholds.from_mapping(compose([]).check)
    assert dataclasses.asdict(th) == defaults


def test_a_check_whose_thresholds_are_not_set_is_refused():
    new = Spec("new_check", 99, "direction", "m", len, (Threshold("new_threshold", "m"),))
    with pytest.raises(ConfigError, match="check.new_threshold is not set: add it to mlpim/conf"):
        checks.thresholds_class((*checks.REGISTRY, new)).from_mapping(compose([]).check)


def test_registry_names_and_rule():
    assert set(checks.CHECKS) == set(SPECS) and checks.CHECKS[0] == "effect"
    assert set(checks.DIRECTION) >= {*checks.BRIDGING, *checks.DORMANT}
    assert checks.BRIDGING and checks.DORMANT  # the rule needs both halves
    for name in checks.DIRECTION:
        assert name in illusion.rule_sentence()
    with pytest.raises(ValueError, match="registered twice"):
        register(SPECS["effect"])
    with pytest.raises(ValueError, match="scope"):
        Spec("x", 1, "everything", "m", len)


def test_illusion_check_computes_the_verdict_once(tmp_path, monkeypatch):
    run(compose(["experiment=ioi_mean_diff", *SMALL]), tmp_path / "resid")
    calls, at_summary = [], []
    counted, summarize = illusion.verdict, runner.summarize
    monkeypatch.setattr(illusion, "verdict", lambda cs: calls.append(1) or counted(cs))
    counting = lambda df: at_summary.append(len(calls)) or summarize(df)  # noqa: E731
    monkeypatch.setattr(
        runner, "EXPERIMENT", dataclasses.replace(runner.EXPERIMENT, summarize=counting)
    )
    overrides = [f"direction={tmp_path / 'resid' / C.DIRECTION}", "extra.n_random_directions=4"]
    overrides += ["extra.reference_cache=null", "extra.n_natural_prompts=100"]
    run(compose(["experiment=illusion_check", *SMALL, *overrides]), tmp_path / "check")
    assert at_summary == [1]  # the runner's one verdict ...
    assert len(calls) == 2  # ... and `summarize`'s, rebuilt from the metrics alone
