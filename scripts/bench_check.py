"""Time `mlpim check` on one direction, side by side in one run: the path before 2026-12-07 (the
random-MLP reference's seeds trained one after another for every epoch, on the pairs prepared a
second time; only that reference cached) against today's (the seeds as one batched problem,
stopped once converged, on the check's own preparation; the site's prepared pairs, natural
activations and references cached too, `extra.activation_cache`); each cold (empty caches) and
warm (the second check of the direction). `--paths serial,batched,bfloat16` adds today's path
with the model in bfloat16 (`model.dtype=bfloat16`).

Usage (flags first, then Hydra overrides for every path):

    .venv/bin/python scripts/bench_check.py [--direction PATH] [--out DIR] [--threads N]
        [--paths P[,P]] model=smollm2-135m [...]

Without `--direction`, `mlpim run experiment=ioi_mlp8_das` finds v_MLP first (timed: the issue's
target is a check no longer than finding the direction). Each check is its own process
(`python -m mlpim check`), so that cold means cold; the runs alternate (every path cold, then
every path warm) so that a change in the machine's load touches each path. Every run's printed
table (`illusion_check.summarize`, to the 3 printed decimals) is compared with the first path's
cold run: the verdict and every value agree, or the cells that differ are printed. The serial
path is `extra.reference_mode=serial method.early_stop=none`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import mlpim
from mlpim import constants as C
from mlpim.config import compose
from mlpim.experiments.common import model_for
from mlpim.experiments.illusion_check import summarize

ROOT = Path(mlpim.__file__).resolve().parents[1]
PATHS = {  # path -> its overrides (the serial path keeps the random-MLP reference only)
    "serial": [
        "extra.reference_mode=serial",
        "method.early_stop=none",
        "extra.activation_cache=null",
    ],
    "batched": [],
    "bfloat16": ["model.dtype=bfloat16"],  # today's path with the model in bfloat16
}
DEFAULT_PATHS = "serial,batched"
DEFAULT_OUT = Path("outputs/bench/bench_check")


def order(paths: list[str]) -> list[tuple[str, str]]:
    """The runs in order: every path cold, then every path warm (load touches each alike)."""
    return [(p, cache) for cache in ("cold", "warm") for p in paths]


ORDER = order(DEFAULT_PATHS.split(","))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--direction", type=Path, help="a saved direction (default: find v_MLP first)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the runs and table")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: as is)")
    p.add_argument(
        "--paths",
        default=DEFAULT_PATHS,
        help=f"comma-separated, the first the baseline: {', '.join(PATHS)} (default {DEFAULT_PATHS})",
    )
    args, overrides = p.parse_known_args(argv)
    if unknown := set(args.paths.split(",")) - set(PATHS):
        p.error(f"unknown path(s) {', '.join(sorted(unknown))}; allowed: {', '.join(PATHS)}")
    return args, overrides


def machine(threads: int | None = None) -> str:
    """This machine in one line: host, CPU, cores, memory, torch's version, the runs' threads."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if "model name" in ln
        ]
        cpu = names[0] if names else cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, torch "
        f"{torch.__version__} ({threads or torch.get_num_threads()} threads)"
    )


def environment(threads: int | None) -> dict[str, str]:
    """The runs' environment: this checkout's mlpim first on the path; threads if asked."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def timed(args: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of `python -m mlpim ARGS`; its output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlpim", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds, code = time.perf_counter() - start, os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"bench-check: `mlpim {' '.join(args)}` failed (exit {code}): {log}")
    return seconds, usage.ru_maxrss / 1024  # kB on Linux


def find_direction(overrides: list[str], out: Path, env: dict[str, str]) -> tuple[Path, float]:
    """v_MLP from `ioi_mlp8_das` with the same overrides but the check's own (`extra.*`); the
    seconds it took."""
    run_dir = out / "find_direction"
    own = [o for o in overrides if o.lstrip("+").startswith("extra.")]
    args = ["run", "experiment=ioi_mlp8_das", *(o for o in overrides if o not in own)]
    args.append(f"hydra.run.dir={run_dir}")
    seconds, _ = timed(args, out / "logs" / "find_direction.log", env)
    return run_dir / C.DIRECTION, seconds


def check_runs(
    direction: Path, overrides: list[str], out: Path, env: dict, paths: list[str]
) -> pd.DataFrame:
    """Every (path, cache) run of `order(paths)`: seconds, peak RSS, and its printed table."""
    rows = []
    for path in paths:
        shutil.rmtree(out / f"cache_{path}", ignore_errors=True)  # cold is cold
    for path, cache in order(paths):
        run_dir = out / f"{path}_{cache}"
        args = ["check", str(direction), *overrides, *PATHS[path]]
        args += [f"extra.reference_cache={out / f'cache_{path}' / 'references'}"]
        if path != "serial":
            args += [f"extra.activation_cache={out / f'cache_{path}' / 'activations'}"]
        args += [f"hydra.run.dir={run_dir}"]
        seconds, rss = timed(args, out / "logs" / f"{path}_{cache}.log", env)
        table = summarize(pd.read_csv(run_dir / C.METRICS)).round(3)
        trained = any(run_dir.glob("history_random_mlp_seed*.csv"))
        reference = "trained" if trained else "cached"
        rows.append(
            {"path": path, "cache": cache, "reference": reference, "seconds": seconds}
            | {"peak_rss_mb": rss, "table": table}
        )
        print(f"  {path:8s} {cache}: {seconds:7.1f} s, peak RSS {rss:6.0f} MB", flush=True)
    return pd.DataFrame(rows)


def differences(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """The printed cells that differ between two check tables, as `check.column: a -> b`."""
    out = []
    for check in a.index.union(b.index):
        for col in a.columns:
            x, y = (t.loc[check, col] if check in t.index else None for t in (a, b))
            if not (x == y or (pd.isna(x) and pd.isna(y))):
                out.append(f"{check}.{col}: {x} -> {y}")
    return out


def report(runs: pd.DataFrame, found: float | None) -> pd.DataFrame:
    """The printed table: seconds and peak RSS per path and cache, the ratio to the first path
    (the baseline) at the same cache, verdict; then what differs from the first cold run."""
    ref, first = runs.table.iloc[0], runs.path.iloc[0]
    runs["verdict"] = [t.loc["verdict", "warning"].split(" (")[0] for t in runs.table]
    runs["differs"] = [len(differences(ref, t)) for t in runs.table]
    base = runs[runs.path == first].set_index("cache").seconds
    ratio = f"ratio_vs_{first}"
    runs[ratio] = [s / base[c] for s, c in zip(runs.seconds, runs.cache, strict=True)]
    cols = ["path", "cache", "reference", "seconds", ratio, "peak_rss_mb"]
    cols += ["differs", "verdict"]
    with pd.option_context("display.width", 200, "display.max_colwidth", 40):
        print("\n" + runs[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if found is not None:
        print(f"finding the direction (ioi_mlp8_das) took {found:.1f} s")
    for _, run in runs.iloc[1:].iterrows():
        diff = differences(ref, run.table)
        said = "; ".join(diff) if diff else "the verdict and every printed value agree"
        print(f"{run.path} {run.cache} vs {first} cold: {said}")
    return runs[cols]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose(["experiment=illusion_check", *overrides])
    out, env = args.out.resolve(), environment(args.threads)
    model_for(cfg)  # a GGUF model is dequantized once, here, not inside the first timed run
    load = os.getloadavg()
    print(f"bench-check {datetime.datetime.now():%Y-%m-%d %H:%M}, model {cfg.model.name}")
    print(f"machine {machine(args.threads)}; load average {load[0]:.2f} at the start")
    found = None
    direction = args.direction
    if direction is None:
        direction, found = find_direction(overrides, out, env)
    runs = check_runs(direction.resolve(), overrides, out, env, args.paths.split(","))
    table = report(runs, found)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    table.assign(
        model=cfg.model.name, machine=machine(args.threads), date=f"{datetime.date.today()}"
    ).to_csv(out / "bench_check.csv", index=False)
    print(f"written: {out / 'bench_check.csv'}")
    return runs


if __name__ == "__main__":
    main()
