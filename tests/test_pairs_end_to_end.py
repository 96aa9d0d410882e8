"""Experiments on a task brought as data: a JSONL of counterfactual pairs, end to end."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import pair_rows, write_jsonl

from mlpim import constants as C
from mlpim.config import compose
from mlpim.errors import ConfigError
from mlpim.run import run


@pytest.fixture
def task(tmp_path):
    """IOI-like pairs written as a user would: same template, the repeated name swapped."""
    return write_jsonl(tmp_path / "task.jsonl", pair_rows())


def overrides(task) -> list[str]:
    return [
        "model=tiny",
        "device=cpu",
        "dataset=pairs",
        f"dataset.path={task}",
        "dataset.min_pairs=5",
        "dataset.batch_size=7",
        "method.epochs=2",
    ]


def test_das_on_a_jsonl_task(task, tmp_path):
    df = run(compose(["experiment=ioi_mlp8_das", *overrides(task)]), tmp_path / "run")
    assert {"clean", "full", "das"} <= set(df.intervention)
    test = df[(df.split == "test") & (df.metric == "fldd")].set_index("intervention").value
    assert test.notna().all() and test["clean"] == 0.0
    saved = pd.read_csv(tmp_path / "run" / C.METRICS)
    assert set(saved.model) == {"tiny"}


def test_mean_diff_on_a_jsonl_task(task, tmp_path):
    df = run(compose(["experiment=ioi_mean_diff", *overrides(task)]), tmp_path / "run")
    cos = df[df.metric == "cosine_with_das"].value
    assert len(cos) == 1 and 0.0 <= cos.iloc[0] <= 1.0


@pytest.mark.parametrize("name", ["ioi_baseline", "ioi_dormant", "ioi_path_patching"])
def test_ioi_only_experiments_refuse_another_task(task, tmp_path, name):
    with pytest.raises(ConfigError, match="IOI-specific"):
        run(compose([f"experiment={name}", *overrides(task)]), tmp_path / "run")


def test_illusion_check_on_a_jsonl_task(task, tmp_path):
    """A verdict on a user's own task: the direction found on it, checked on its pairs."""
    run(compose(["experiment=ioi_mlp8_das", *overrides(task)]), tmp_path / "das")
    checks = [
        "extra.random_mlp_seeds=1",
        "extra.random_mlp_epochs=1",
        "extra.reference_cache=null",
        "extra.n_random_directions=4",
        "extra.n_natural=2",
        "extra.n_random=50",
    ]
    cfg = compose(
        [
            "experiment=illusion_check",
            *overrides(task),
            *checks,
            f"direction={tmp_path / 'das' / C.DIRECTION}",
        ]
    )
    df = run(cfg, tmp_path / "check")
    assert "verdict" in set(df.intervention)
    assert (tmp_path / "check" / C.VERDICT).exists()


def test_locate_and_nullspace_on_a_jsonl_task(task, tmp_path):
    """Full-component patching and the row/null split on the task's own pairs (no IOI)."""
    df = run(compose(["experiment=ioi_locate", *overrides(task)]), tmp_path / "loc")
    assert {"resid_pre", "attn_out", "mlp_out", "resid_post", "z"} <= set(df.site)
    assert not (tmp_path / "loc" / "landmarks.yaml").exists()  # the IOI landmark rule only
    df = run(compose(["experiment=ioi_nullspace", *overrides(task)]), tmp_path / "null")
    sep = df[df.metric == "separation"]
    assert len(sep) == 3 and sep.value.notna().all()  # base vs source, per part
