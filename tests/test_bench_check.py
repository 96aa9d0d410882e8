"""`make bench-check`'s logic on the tiny model: both paths, cold and warm, their tables compared
(the runs in this process; `scripts/bench_check.py` runs each in its own; never timings)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import FAST, REFS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_check_compares_both_paths_cold_and_warm(tmp_path, monkeypatch, capsys):
    bench = load_script()
    from mlpim.cli import main

    def in_process(args, log, env):  # `python -m mlpim ARGS`, here
        start = time.perf_counter()
        main(list(args))
        return time.perf_counter() - start, float("nan")

    monkeypatch.setattr(bench, "timed", in_process)
    overrides = [*FAST, *REFS, "extra.n_natural_prompts=40"]
    runs = bench.main(["--out", str(tmp_path), *overrides])
    out = capsys.readouterr().out
    assert list(zip(runs.path, runs.cache, strict=True)) == bench.ORDER
    assert list(runs.reference) == ["trained", "trained", "cached", "cached"]
    assert runs.verdict.nunique() == 1  # the label never moves
    for _, run in runs.iloc[1:].iterrows():  # only the random-MLP site note may move
        cells = bench.differences(runs.table.iloc[0], run.table)
        assert all(c.startswith("random_mlp.") for c in cells), cells
        assert f"{run.path} {run.cache} vs serial cold: " in out
    assert (runs.differs[runs.path == "serial"] == 0).all()  # warm = cold
    saved = pd.read_csv(tmp_path / "bench_check.csv")
    assert set(saved.path) == {"serial", "batched"} and (saved.model == "tiny").all()
    assert "finding the direction (ioi_mlp8_das) took" in out


def test_paths_run_cold_then_warm_and_an_unknown_one_is_refused(capsys):
    bench = load_script()
    assert bench.order(["batched", "bfloat16"]) == [
        ("batched", "cold"),
        ("bfloat16", "cold"),
        ("batched", "warm"),
        ("bfloat16", "warm"),
    ]
    assert bench.PATHS["bfloat16"] == ["model.dtype=bfloat16"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--paths", "batched,fp8"])
    assert "unknown path(s) fp8" in capsys.readouterr().err


def test_differences_name_each_printed_cell():
    bench = load_script()
    a = pd.DataFrame({"value": [0.5, 1.0], "warning": ["no", "x"]}, index=["effect", "verdict"])
    b = a.copy()
    assert bench.differences(a, b) == []
    b.loc["effect", "value"], b.loc["verdict", "warning"] = 0.501, "y"
    assert bench.differences(a, b) == ["effect.value: 0.5 -> 0.501", "verdict.warning: x -> y"]
    nan = a.assign(value=float("nan"))
    assert bench.differences(nan, nan.copy()) == []


def test_bench_lds_times_both_paths_on_each_engine_and_they_agree(tmp_path):
    """`make bench`'s second table on the tiny model: per engine, the whole-vocabulary path and
    the two-column path, their FLDDs within 1e-4 (never timings)."""
    path = SCRIPT.with_name("bench_lds.py")
    spec = importlib.util.spec_from_file_location("bench_lds", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--directions", "2", "--out", str(tmp_path / "t.csv"), "model=tiny"])
    assert set(table.engine) == {"kernel", "cache"} and len(table) == 4
    assert (table.max_fldd_diff <= 1e-4).all() and (tmp_path / "t.csv").exists()
    assert (table.groupby("engine").vs_before.first() == 1.0).all()
