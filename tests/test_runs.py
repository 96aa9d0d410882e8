"""Runs you can trust (issue 11): run identity in DONE, refusals, atomic writes and interrupted
runs, checks before the model loads, errors vs bugs, `run_experiment`, same seed same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import FAST, assert_one_line_error, mlpim_process, outcome

import mlpim.experiments
from mlpim import constants as C
from mlpim.config import compose
from mlpim.errors import MlpimError
from mlpim.experiments import Experiment
from mlpim.options import NoOptions
from mlpim.preflight import preflight
from mlpim.run import RunDirError, read_done, run, run_experiment


@pytest.fixture
def fake_runner(monkeypatch):
    """Replace every runner by a fast one writing one metric row; returns the call log."""
    calls = []

    def runner(cfg, run_dir, directions):
        calls.append(run_dir)
        (Path(run_dir) / C.SUMMARY).write_text("partial\n")
        return pd.DataFrame(
            [
                {
                    "model": cfg.model.name,
                    "experiment": cfg.experiment,
                    "intervention": "clean",
                    "split": "test",
                    "metric": "x",
                    "value": float(cfg.seed),
                }
            ]
        )

    monkeypatch.setattr(
        mlpim.experiments, "get_experiment", lambda name: Experiment(runner, NoOptions)
    )
    return calls


# ----- run identity -----


def test_done_records_the_config_hash_version_and_commit(tmp_path, fake_runner):
    cfg = compose(["experiment=ioi_mlp8_das", *FAST])
    run(cfg, tmp_path / "r")
    done = read_done(tmp_path / "r")
    assert set(done) >= {"config_hash", "experiment", "mlpim_version", "git_commit", "seconds"}
    assert done["experiment"] == "ioi_mlp8_das" and len(done["config_hash"]) == 16
    assert run(cfg, tmp_path / "r") is None and len(fake_runner) == 1  # same config: skipped
    other = compose(["experiment=ioi_mlp8_das", *FAST, "seed=1"])
    with pytest.raises(RunDirError, match=r"seed: 0 -> 1.*hydra\.run\.dir="):
        run(other, tmp_path / "r")
    assert len(fake_runner) == 1


def test_interrupted_run_leaves_no_done_and_reruns(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a runner: no DONE, no metrics.csv; the same command then runs."""
    real = mlpim.experiments.get_experiment

    def interrupted(name):
        def runner(cfg, run_dir, directions):
            (Path(run_dir) / C.SUMMARY).write_text("half of a summ")
            raise KeyboardInterrupt

        return Experiment(runner, NoOptions)

    cfg = compose(["experiment=ioi_mlp8_das", *FAST])
    monkeypatch.setattr(mlpim.experiments, "get_experiment", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / C.DONE).exists() and not (tmp_path / "r" / C.METRICS).exists()
    assert not list((tmp_path / "r").glob(".*tmp*"))  # no temporary files left
    monkeypatch.setattr(mlpim.experiments, "get_experiment", real)
    df = run(cfg, tmp_path / "r")
    assert df is not None and (tmp_path / "r" / C.DONE).exists()
    assert pd.read_csv(tmp_path / "r" / C.METRICS).shape == df.shape


def test_cli_refuses_another_experiment_in_a_finished_dir(tmp_path):
    run_dir = tmp_path / "D"
    run_dir.mkdir()
    (run_dir / C.RESOLVED_CONFIG).write_text("experiment: toy_illusion\nrunner: toy_illusion\n")
    (run_dir / C.DONE).write_text(json.dumps({"config_hash": "0" * 16}))
    proc = mlpim_process(
        ["run", "experiment=ioi_baseline", "model=tiny", f"hydra.run.dir={run_dir}"], tmp_path
    )
    needles = ("toy_illusion", "ioi_baseline", "hydra.run.dir=")
    assert_one_line_error(*outcome(proc), *needles, prefix="mlpim: error:")
    assert "skipping" not in proc.stdout + proc.stderr
    assert not (run_dir / C.METRICS).exists()


def test_paper_refuses_changed_steps_before_any_work(tmp_path, fake_runner):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "paper", Path(__file__).resolve().parents[1] / "scripts" / "paper.py"
    )
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    args = ["--only", "ioi_baseline,ioi_locate", "--out", str(tmp_path), "model=tiny"]
    paper.main(args)
    assert len(fake_runner) == 2
    paper.main(args)  # unchanged: both steps resumed (skipped)
    assert len(fake_runner) == 2
    with pytest.raises(SystemExit, match=r"ioi_baseline \(seed: 0 -> 3\).*--out"):
        paper.main([*args, "seed=3"])
    assert len(fake_runner) == 2


# ----- checks before the model loads, errors vs bugs -----


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["direction=/no/such/file.pt"], ["direction=/no/such/file.pt", "no such file"]),
        (["method.dim=5000"], ["method.dim=5000", "1..128"]),
        (["experiment=ioi_nullspace", "site=resid_post"], ["site=resid_post", "mlp_post"]),
        (["experiment=ioi_alignment", "site.layer=2"], ["ioi_alignment ignores site.layer=2"]),
        (["experiment=ioi_alignment", "++extra.n_randm=5"], ["did you mean extra.n_random?"]),
    ],
)
def test_preflight_refuses_before_the_model_loads(overrides, needles, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    # model_for's own call: an experiment module that binds model_for on import keeps this fake
    monkeypatch.setattr("mlpim.experiments.common.load_model", no_model)
    with pytest.raises(MlpimError) as e:  # an unknown option: already when composing
        preflight(compose([*FAST, *overrides]), overrides)
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize(
    ("override", "needle"), [("method.dim=5000", "1..1536"), ("site.layer=50", "layers 0..29")]
)
def test_preflight_knows_the_bundled_model_without_loading_it(override, needle):
    """SmolLM2's sizes are in its config: a bad dim or layer is refused before the minute of
    loading and preparing (the issue's example)."""
    cfg = compose(["experiment=ioi_mlp8_das", "model=smollm2-135m", override])
    with pytest.raises(MlpimError, match=needle.replace(".", r"\.")):
        preflight(cfg, [override])


def test_cli_preflight_errors_are_one_line(tmp_path):
    bad = tmp_path / "not_a_tensor.pt"
    bad.write_text("hello")
    for args, needle in [
        (["direction=/no/such/file.pt"], "no such file"),
        ([f"direction={bad}"], "not a torch"),
        (["experiment=ioi_path_patching", "site.layer=1"], "ignores site.layer=1"),
    ]:
        proc = mlpim_process(["run", *FAST, *args, f"hydra.run.dir={tmp_path}/r"], tmp_path)
        assert_one_line_error(*outcome(proc), needle, prefix="mlpim: error:")
        assert not (tmp_path / "r" / C.RESOLVED_CONFIG).exists()


def test_a_bug_keeps_its_traceback(tmp_path):
    code = (
        "import sys, mlpim.experiments as E\n"
        "def runner(cfg, d, directions):\n    raise ValueError('internal bug in pandas')\n"
        "from mlpim.options import NoOptions\n"
        "E.get_experiment = lambda name: E.Experiment(runner, NoOptions)\n"
        "from mlpim.cli import main\nmain(sys.argv[1:])\n"
    )
    proc = mlpim_process(["run", *FAST, f"hydra.run.dir={tmp_path}/r"], tmp_path, code=code)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" in out and "internal bug in pandas" in out, out
    assert "mlpim: error:" not in out


def test_user_errors_share_one_type():
    from mlpim.errors import ConfigError, ModelNotFoundError
    from mlpim.report.collect import CollectError

    for cls in (ConfigError, ModelNotFoundError, RunDirError, CollectError):
        assert issubclass(cls, MlpimError), cls


# ----- a library as well as a CLI -----


def test_importing_mlpim_keeps_the_matplotlib_backend(tmp_path):
    code = (
        "import os, matplotlib\n"
        "import mlpim.run, mlpim.report.io, mlpim.report.collect, mlpim.config, mlpim.sweep\n"
        "import mlpim.engine.models, mlpim.experiments.common\n"
        "print(matplotlib.get_backend(), os.environ.get('HF_HUB_OFFLINE', 'unset'))\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().lower() == "svg unset"  # nor the hub's environment


def test_run_experiment_returns_results_without_files(tmp_path, monkeypatch):
    import tempfile

    made = []

    class Recorded(tempfile.TemporaryDirectory):
        def __enter__(self):
            made.append(Path(self.name))
            return super().__enter__()

    monkeypatch.setattr("mlpim.run.tempfile.TemporaryDirectory", Recorded)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = run_experiment(compose(["experiment=ioi_mlp8_das", *FAST]))
    assert {"fldd", "iia"} <= set(result.metrics.metric)
    assert C.SUMMARY in result.tables and "history.csv" in result.tables
    assert result.figures and all(b.startswith(b"\x89PNG") for b in result.figures.values())
    assert C.DIRECTION in result.files
    assert len(made) == 1 and not made[0].exists()  # its working directory is gone
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing written where it ran


# ----- same seed, same numbers -----


def test_same_seed_gives_byte_identical_metrics(tmp_path):
    cfg = compose(["experiment=ioi_mlp8_das", *FAST, "method.epochs=2", "seed=3"])
    run(cfg, tmp_path / "a")
    run(cfg, tmp_path / "b")
    a, b = (tmp_path / d / C.METRICS for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert {"das", "full"} <= set(pd.read_csv(a).intervention)
