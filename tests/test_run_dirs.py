"""Faults during runs (issue 18), on the tiny model: a task validated whole (every problem with its
line, in every split), runs refused without touching the directory, Ctrl-C, a full disk (a
write that fails with ENOSPC, and a real small tmpfs where this process may mount one), a second
run into a directory in use, and a run killed with SIGKILL during training, then run again.
Each asserts the exit code, the one `mlpim: ...` line, and what is (not) on disk afterwards."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import (
    PROBE,
    assert_one_line_error,
    cli,
    on_disk,
    pair_rows,
    subprocess_env,
    tmpfs,
    write_jsonl,
)

import mlpim.experiments
from mlpim import constants as C
from mlpim import lock
from mlpim.experiments import Experiment
from mlpim.options import NoOptions
from mlpim.report import io

PAIRS = ["experiment=ioi_mlp8_das", *PROBE, "dataset=pairs", "dataset.min_pairs=5"]
RESULTS = (C.DONE, C.METRICS, C.DIRECTION, C.SUMMARY)


def temporary_files(run_dir: Path) -> list[str]:
    return [p for p in on_disk(run_dir) if ".tmp" in p]


def task_rows(name: str) -> list[dict]:
    rows = pair_rows()
    for i, row in enumerate(rows):
        if name in ("identical_prompts", "identical_answers"):
            row["source"] = row["base"]
        if name == "identical_answers":
            row["source_answer"] = row["base_answer"]
        if name == "bad_spans" and i % 2 == 0:
            row.update(position="span", base_span="Zed", source_span=row["source"].split()[1])
    if name == "too_long":
        rows[3]["base"] = " ".join(["Mary and John went to the store ,"] * 30) + " Mary gave to"
    return rows


TASKS = {  # probe -> (lines that must each be reported, what every such line says)
    "identical_prompts": (range(1, 25), "base and source prompts are identical"),
    "identical_answers": (range(1, 25), "are the same token"),  # was a ZeroDivisionError
    "too_long": ([4], "tokens with BOS, longer than the model's context of 128"),
    "bad_spans": (range(1, 20, 2), "base_span 'Zed' not found"),  # lines of both splits
}


@pytest.mark.parametrize("name", TASKS)
def test_task_is_validated_whole(name, tmp_path, capsys):
    """Every problem of the file, each with its line, before the split: one error, exit 2."""
    task = write_jsonl(tmp_path / "task.jsonl", task_rows(name))
    code, out = cli(capsys, "run", *PAIRS, f"dataset.path={task}", f"hydra.run.dir={tmp_path}/r")
    head = assert_one_line_error(code, out, f"task file {task}")
    lines, says = TASKS[name]
    for n in lines:
        assert any(f"task.jsonl line {n}: " in s and says in s for s in out.splitlines()), n
    reported = [s for s in out.splitlines() if s.startswith("  task.jsonl line ")]
    assert "ZeroDivisionError" not in out and head.endswith(f": {len(reported)} problem(s)")
    assert not any((tmp_path / "r" / f).exists() for f in RESULTS)


def test_min_pairs_names_each_split_and_drops_are_counted(tmp_path, capsys):
    task = write_jsonl(tmp_path / "task.jsonl", pair_rows())
    args = [*PAIRS, f"dataset.path={task}", "dataset.min_pairs=14", f"hydra.run.dir={tmp_path}/r"]
    assert_one_line_error(
        *cli(capsys, "run", *args),
        "test",
        "dataset.min_pairs=14 applies to each split",
        "train 14, test 10 (of 24 valid pair(s))",
    )
    loose = write_jsonl(tmp_path / "loose.jsonl", pair_rows(group=False))
    args = [*PAIRS, f"dataset.path={loose}", "dataset.min_pairs=1", f"hydra.run.dir={tmp_path}/l"]
    code, out = cli(capsys, "run", *args)
    assert code == 0, out
    warning = [s for s in out.splitlines() if "[WARNING]" in s and "dropped" in s]
    assert len(warning) == 1 and "10 of 24 valid pair(s) dropped" in warning[0], out
    assert "give each pair a meta.group" in warning[0]


def test_refused_run_changes_nothing_and_finished_runs_are_read_only(tmp_path, capsys):
    """Another config into a finished directory: refused, not one file touched (no .hydra/ or
    log rewritten). The same config again: skipped, not one file touched either."""
    run_dir = tmp_path / "r"
    args = ["experiment=ioi_mlp8_das", *PROBE, f"hydra.run.dir={run_dir}"]
    assert cli(capsys, "run", *args)[0] == 0
    before = on_disk(run_dir)
    assert {C.DONE, ".hydra/config.yaml", C.LOG} <= set(before)
    assert_one_line_error(*cli(capsys, "run", *args, "seed=1"), "seed: 0 -> 1", "hydra.run.dir=")
    assert on_disk(run_dir) == before
    code, out = cli(capsys, "run", *args)
    assert code == 0 and "skipping" in out, out
    assert on_disk(run_dir) == before


def interrupting(writes: bool):
    def runner(cfg, run_dir, directions):
        if writes:
            io.write_text("a complete table\n", Path(run_dir), C.SUMMARY)
        raise KeyboardInterrupt

    return lambda name: Experiment(runner, NoOptions)


@pytest.mark.parametrize("writes", [False, True])
def test_ctrl_c_is_one_line_and_the_same_command_reruns(writes, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "r"
    args = ["experiment=ioi_mlp8_das", *PROBE, f"hydra.run.dir={run_dir}"]
    real = mlpim.experiments.get_experiment
    monkeypatch.setattr(mlpim.experiments, "get_experiment", interrupting(writes))
    line = assert_one_line_error(*cli(capsys, "run", *args), str(run_dir), "(no DONE)", exit=130)
    if writes:
        assert "holds an unfinished run" in line and C.SUMMARY in line
    else:
        assert line == f"mlpim: interrupted; nothing was written to {run_dir} (no DONE)"
    assert C.DONE not in on_disk(run_dir) and not temporary_files(run_dir)
    assert not lock.is_locked(run_dir) and not lock.HELD
    monkeypatch.setattr(mlpim.experiments, "get_experiment", real)
    assert cli(capsys, "run", *args)[0] == 0 and (run_dir / C.DONE).exists()


def full_disk(monkeypatch, target: str) -> None:
    """Writes of `target` (by the writer each artifact uses) fail half-way with ENOSPC."""

    def failing(write):
        def fails(obj, arg, *args, **kwargs):
            path = obj if isinstance(obj, Path) else Path(arg)  # Path.write_bytes(self, data)
            if path.suffix != Path(target).suffix or Path(target).stem not in path.name:
                return write(obj, arg, *args, **kwargs)
            with open(path, "wb") as f:
                f.write(b"half a fi")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        return fails

    import matplotlib.figure

    owner, name = {
        ".pt": (Path, "write_bytes"),
        ".png": (matplotlib.figure.Figure, "savefig"),
        ".csv": (pd.DataFrame, "to_csv"),
    }[Path(target).suffix]
    monkeypatch.setattr(owner, name, failing(getattr(owner, name)))


@pytest.mark.parametrize("target", [C.DIRECTION, "interventions.png", C.METRICS])
def test_full_disk_leaves_no_partial_file(target, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "r"
    full_disk(monkeypatch, target)
    args = ["experiment=ioi_mlp8_das", *PROBE, f"hydra.run.dir={run_dir}"]
    assert_one_line_error(
        *cli(capsys, "run", *args),
        f"disk full while writing {run_dir / target}",
        "nothing partial was left",
    )
    left = on_disk(run_dir)
    assert target not in left and C.DONE not in left and not temporary_files(run_dir), left


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 32 KiB tmpfs: a real full disk; skipped where this process may not mount one."""
    path = tmp_path / "small"
    path.mkdir()
    with tmpfs(path, "size=32k"):
        yield path


def test_really_full_disk(small_tmpfs, capsys):
    run_dir = small_tmpfs / "r"
    args = ["experiment=ioi_mlp8_das", *PROBE, f"hydra.run.dir={run_dir}"]
    assert_one_line_error(
        *cli(capsys, "run", *args), "disk full while writing", "nothing partial was left"
    )
    left = on_disk(run_dir)
    assert C.DONE not in left and not temporary_files(run_dir), left
    assert all((run_dir / name).stat().st_size > 0 for name in left), left
    if C.RESOLVED_CONFIG in left:  # complete: down to its last key
        assert "ignores" in yaml.safe_load((run_dir / C.RESOLVED_CONFIG).read_text())


def test_second_run_refused_then_sigkill_during_training_and_rerun(tmp_path, capsys):
    """Run A trains in another process; run B (another experiment) into the same directory is
    refused in one line and changes nothing. A is killed (SIGKILL) during training: the OS
    releases the lock, A leaves no DONE, no results and no temporary file, and the same command
    then runs from scratch to DONE."""
    run_dir = tmp_path / "r"
    args = ["experiment=ioi_mlp8_das", *PROBE, "method.epochs=600", f"hydra.run.dir={run_dir}"]
    a = subprocess.Popen(
        [sys.executable, "-m", "mlpim", "run", *args],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen = b""
        while b"DAS blocks" not in seen:  # its training progress bar
            chunk = os.read(a.stderr.fileno(), 65536)
            assert chunk, f"run A ended before training: {seen.decode()[-2000:]}"
            seen += chunk
        assert lock.is_locked(run_dir)
        before = on_disk(run_dir)
        other = ["experiment=ioi_mean_diff", *PROBE, f"hydra.run.dir={run_dir}"]
        assert_one_line_error(*cli(capsys, "run", *other), "in use by another mlpim run")
        assert on_disk(run_dir) == before
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
        a.stderr.close()
    assert a.returncode == -signal.SIGKILL
    assert not lock.is_locked(run_dir)
    left = on_disk(run_dir)
    assert not any(f in left for f in RESULTS) and not temporary_files(run_dir), left
    code, out = cli(capsys, "run", *args)
    assert code == 0 and (run_dir / C.DONE).exists(), out
    assert {"das", "full"} <= set(pd.read_csv(run_dir / C.METRICS).intervention)


def test_finished_runs_and_sweep_folders_are_never_written(tmp_path, capsys):
    """A finished run, a sweep folder and anything inside them: no run or sweep goes there (one
    line, exit 2, not one file touched); `collect` of a run writes next to it, or to --out."""
    run_dir, sweep_dir = tmp_path / "r", tmp_path / "s"
    args = ["experiment=ioi_mlp8_das", *PROBE]
    assert cli(capsys, "run", *args, f"hydra.run.dir={run_dir}")[0] == 0
    (sweep_dir / "0").mkdir(parents=True)  # a sweep folder as Hydra leaves one
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    (sweep_dir / "0" / C.METRICS).write_text((run_dir / C.METRICS).read_text())
    before = on_disk(tmp_path)
    refusals = {
        f"hydra.run.dir={run_dir}/nested": f"is inside the finished run {run_dir}",
        f"hydra.run.dir={sweep_dir}": "is a sweep folder",
        f"hydra.run.dir={sweep_dir}/0": f"is inside the sweep folder {sweep_dir}",
        f"hydra.sweep.dir={run_dir}": "is a finished run",
        f"hydra.sweep.dir={run_dir}/sweep": f"is inside the finished run {run_dir}",
        f"hydra.sweep.dir={sweep_dir}/0": f"is inside the sweep folder {sweep_dir}",
    }
    for where, says in refusals.items():
        sweep = ["-m", "seed=0,1"] if where.startswith("hydra.sweep") else []
        assert_one_line_error(
            *cli(capsys, "run", *sweep, *args, where), says, "never written by another"
        )
        assert on_disk(tmp_path) == before, where
    code, out = cli(capsys, "collect", str(run_dir))
    assert code == 0 and f"{tmp_path}/r_collected/{C.COLLECTED}" in out, out
    assert_one_line_error(
        *cli(capsys, "collect", str(run_dir), "--out", f"{run_dir}/c"), "--out", "inside"
    )
    assert cli(capsys, "collect", str(run_dir), "--out", f"{tmp_path}/c")[0] == 0
    assert cli(capsys, "collect", str(sweep_dir))[0] == 0  # a sweep's table: in its folder
    assert on_disk(run_dir) == {k[2:]: v for k, v in before.items() if k.startswith("r/")}
    assert {f"c/{C.COLLECTED}", f"r_collected/{C.COLLECTED}", f"s/{C.COLLECTED}"} == set(
        on_disk(tmp_path)
    ) - set(before)
