"""Sweeps through the command line (`mlpim run -m`) with each launcher, re-runs, `mlpim collect`.

The end-to-end tests run the tiny random model as subprocesses (2 jobs each, 1 DAS epoch, small
datasets), with `hydra.sweep.dir` under tmp_path; `collect` is also tested on synthetic metrics.
The re-run (skipping finished jobs) is tested with the basic launcher only: a re-run through the
joblib or submitit launcher costs ~20 s of worker start-up for the same code path (`run` skips a
directory holding DONE, whichever process calls it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import FAST, assert_one_line_error, mlpim_process, outcome, subprocess_env

from mlpim import constants as C
from mlpim.report.collect import CollectError, collect, collect_cli

SWEEP = ["run", "-m", "experiment=ioi_mlp8_das", *FAST]


def sweep(tmp_path: Path, sweep_dir: Path, *overrides: str, rc: int = 0):
    """`mlpim run -m` of SWEEP and `overrides` into `sweep_dir`, asserting its exit code `rc`."""
    args = [*SWEEP, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    proc = mlpim_process(args, tmp_path, subprocess_env(HYDRA_FULL_ERROR="1"))
    assert proc.returncode == rc, (
        f"mlpim {' '.join(args)}: exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def finished_jobs(sweep_dir: Path, n: int) -> dict[Path, int]:
    """Assert jobs 0..n-1 finished; their metrics.csv paths -> mtime (ns)."""
    out = {}
    for i in range(n):
        job = sweep_dir / str(i)
        assert (job / C.DONE).exists(), f"{job} did not finish: {sorted(os.listdir(sweep_dir))}"
        metrics = pd.read_csv(job / C.METRICS)
        assert {"fldd", "iia"} <= set(metrics.metric)
        out[job / C.METRICS] = (job / C.METRICS).stat().st_mtime_ns
    assert not (sweep_dir / str(n)).exists()
    return out


def assert_rerun_skips(tmp_path: Path, sweep_dir: Path, before: dict[Path, int], *overrides):
    jobs = {p: p.stat().st_mtime_ns for m in before for p in m.parent.rglob("*") if p.is_file()}
    proc = sweep(tmp_path, sweep_dir, *overrides)
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before, "a finished job was re-run (metrics.csv rewritten)"
    assert f"0 finished, {len(before)} skipped, 0 failed" in proc.stdout
    # finished jobs are read-only to the re-run: not even status.json or .hydra/ rewritten
    assert {p: p.stat().st_mtime_ns for p in jobs} == jobs


def test_basic_sweep_rerun_and_collect(tmp_path, capsys):
    sweep_dir = tmp_path / "multirun"
    sweep(tmp_path, sweep_dir, "site.layer=range(0,2)")
    before = finished_jobs(sweep_dir, 2)
    layers = {int(pd.read_csv(p).layer.iloc[0]) for p in before}
    assert layers == {0, 1}

    assert_rerun_skips(tmp_path, sweep_dir, before, "site.layer=range(0,2)")
    # another grid into the same directory: refused whole, in one line, before anything is
    # written (no multirun.yaml, .hydra/ or status.json rewritten)
    files = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()}
    proc = sweep(tmp_path, sweep_dir, "site.layer=range(1,3)", rc=2)
    needles = ("site.layer: 0 -> 1", "hydra.sweep.dir=")
    assert_one_line_error(*outcome(proc), *needles, prefix="mlpim: error:")
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()} == files

    df = collect(sweep_dir)
    assert sorted(df.job.unique()) == ["0", "1"]
    assert len(df) == sum(len(pd.read_csv(p)) for p in before)
    assert (sweep_dir / C.COLLECTED).exists()
    assert (sweep_dir / "by_layer_mlp_post.png").exists()
    assert not (sweep_dir / "by_dim_mlp_post.png").exists()  # one dim only: no plot
    collect_cli([str(sweep_dir)])
    out = capsys.readouterr().out
    assert "collected 2 job(s)" in out and "FLDD" in out and str(sweep_dir / C.COLLECTED) in out


def test_joblib_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "multirun"
    proc = sweep(tmp_path, sweep_dir, "hydra/launcher=local", "seed=0,1")
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    finished_jobs(sweep_dir, 2)


def test_failed_jobs_are_reported_and_the_sweep_exits_nonzero(tmp_path, capsys):
    """`site.layer=1,50` on a 3-layer model through the joblib launcher: one job fails."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "multirun"
    proc = sweep(tmp_path, sweep_dir, "hydra/launcher=local", "site.layer=1,50", rc=1)
    table = proc.stdout[proc.stdout.index(f"sweep {sweep_dir}:") :]
    assert "1 finished, 0 skipped, 1 failed" in table
    failed = [line for line in table.splitlines() if " failed " in line]
    assert len(failed) == 1 and "site.layer=50" in failed[0] and "layers 0..2" in failed[0]
    assert (sweep_dir / "0" / C.DONE).exists() and not (sweep_dir / "1" / C.DONE).exists()
    assert not (sweep_dir / "1").exists()  # refused before it ran: its directory left as it was
    collect_cli([str(sweep_dir)])
    out = capsys.readouterr().out
    assert "collected 1 job(s)" in out and "1 job(s) not collected" in out
    assert "failed: site.layer=50" in out


def test_submitit_local_sweep(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher is not installed (pip install 'mlpim[slurm]')",
    )
    sweep_dir = tmp_path / "multirun"
    sweep(tmp_path, sweep_dir, "hydra/launcher=submitit_local_test", "seed=0,1")
    assert (sweep_dir / ".submitit").is_dir()
    finished_jobs(sweep_dir, 2)


# ----- collect on synthetic metrics (fast) -----


def fake_job(path: Path, layer: int, dim: int, seed: int, overrides: list[str] | None = None):
    rows = []
    for intervention in ("clean", "full", "das"):
        for split in ("train", "test"):
            for metric in ("fldd", "iia", "logit_diff"):
                value = None if intervention == "clean" and metric == "iia" else layer + dim + seed
                rows.append(
                    dict(
                        model="tiny",
                        experiment="x",
                        intervention=intervention,
                        site="mlp_post",
                        layer=layer,
                        split=split,
                        metric=metric,
                        value=value,
                        dim=dim,
                        seed=seed,
                    )
                )
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / C.METRICS, index=False)
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_collect_synthetic(tmp_path, capsys):
    n = 0
    for layer in (0, 1, 2):
        for dim in (1, 2):
            for seed in (0, 1):
                lr = 0.1 if layer == 2 else 0.01
                fake_job(
                    tmp_path / "sweep" / ("nested" if n >= 10 else "") / str(n),
                    layer,
                    dim,
                    seed,
                    [f"site.layer={layer}", f"method.dim={dim}", f"seed={seed}", f"method.lr={lr}"],
                )
                n += 1
    (tmp_path / "sweep" / ".submitit" / "1").mkdir(parents=True)
    (tmp_path / "sweep" / ".submitit" / "1" / C.METRICS).write_text("not,a\nmetrics,file\n")
    df = collect(tmp_path / "sweep")
    assert df.job.nunique() == 12 and df.job.iloc[0] == "0" and df.job.iloc[-1] == "nested/11"
    assert list(df.columns[:2]) == ["job", "model"]
    assert set(df["method.lr"]) == {0.1, 0.01}  # a swept override without its own column
    assert (tmp_path / "sweep" / "by_layer_mlp_post.png").exists()
    assert (tmp_path / "sweep" / "by_dim_mlp_post.png").exists()
    again = pd.read_csv(tmp_path / "sweep" / C.COLLECTED)
    assert len(again) == len(df) == 12 * 18

    collect_cli([str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    assert "collected 12 job(s)" in out
    assert "1.500 ± 0.707" in out  # layer 0, dim 1: seeds 0 and 1 give values 1 and 2
    assert "4.500 ± 0.707" in out  # layer 2, dim 2


def test_collect_lists_missing_and_failed_jobs(tmp_path, capsys):
    fake_job(tmp_path / "sweep" / "0", 0, 1, 0, ["site.layer=0"])
    (tmp_path / "sweep" / "1" / ".hydra").mkdir(parents=True)  # started, never finished
    (tmp_path / "sweep" / "2").mkdir()
    status = {"status": "failed", "reason": "method.dim=9: too wide", "overrides": []}
    (tmp_path / "sweep" / "2" / "status.json").write_text(json.dumps(status))
    collect_cli([str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    assert "collected 1 job(s)" in out and "2 job(s) not collected" in out
    assert "1  missing: no metrics.csv" in out and "2  failed: method.dim=9: too wide" in out
    shutil.rmtree(tmp_path / "sweep" / "0")
    with pytest.raises(CollectError, match="1: missing.*2: failed"):
        collect(tmp_path / "sweep")


def test_collect_errors(tmp_path, capsys):
    with pytest.raises(CollectError, match="does not exist"):
        collect(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectError, match="no metrics.csv"):
        collect(tmp_path / "empty")
    with pytest.raises(SystemExit) as e:
        collect_cli([str(tmp_path / "empty")])
    assert e.value.code == 2
    assert "no metrics.csv" in capsys.readouterr().err
