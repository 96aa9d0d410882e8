"""`run(cfg, run_dir)`: check, dispatch to the experiment's runner, write the run directory.

A finished run directory holds `DONE`: JSON with the hash of the resolved config, the code that
ran it (mlpim's version, git commit, dirty flag and the hash of mlpim's files, `mlpim.identity`)
and the SHA-256 of every input file the config names. The same config, code and inputs aimed at
it again are skipped; a change in any of them is refused with one line saying which changed, so
that no finished result is overwritten (`scripts/paper.py` re-runs a step whose input changed).
`run_experiment(cfg)` runs an experiment without leaving files and returns its results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mlpim import constants as C
from mlpim import experiments, lock, reuse
from mlpim.engine.direction import Direction
from mlpim.engine.models import resolve_device, resolve_dtype
from mlpim.errors import MlpimError
from mlpim.identity import code_change, code_version, input_change, input_hashes
from mlpim.preflight import preflight
from mlpim.report import io
from mlpim.report.collect import enclosing

log = logging.getLogger("mlpim")

NEW_DIR_HINT = "choose a new directory (hydra.run.dir=DIR, or hydra.sweep.dir=DIR with -m)"


class RunDirError(MlpimError):
    """The run directory holds results of another config, code or inputs, or results without
    DONE."""

    diff: str = ""  # what differs: the config keys (`key: old -> new, ...`), code or input files
    changed: str = "config"  # config | code | inputs


NOT_IDENTITY = ("hydra", "ignores", "sites")  # Hydra's node; what the experiment declares it reads


def config_dict(cfg: DictConfig | dict) -> dict:
    """The resolved config as plain data, without the keys that do not change results."""
    data = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in data.items() if k not in NOT_IDENTITY}


def config_hash(cfg: DictConfig | dict) -> str:
    """SHA-256 (16 hex digits) of the resolved config: what identifies a run."""
    text = json.dumps(config_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_done(run_dir: Path) -> dict | None:
    """DONE's record; None when absent; {} for a DONE that is not mlpim's JSON."""
    path = Path(run_dir) / C.DONE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _flat(data, prefix: str = "") -> dict[str, object]:
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def config_diff(old: dict, new: dict, limit: int = 4) -> str:
    """The keys whose values differ, as `key: old -> new`, at most `limit` of them."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    parts = [f"{k}: {a.get(k, '<unset>')!s:.40} -> {b.get(k, '<unset>')!s:.40}" for k in keys]
    more = f" (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _stored_config(run_dir: Path) -> dict | None:
    path = run_dir / C.RESOLVED_CONFIG
    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else None


def check_run_dir(cfg: DictConfig, run_dir: Path) -> bool:
    """True when `run_dir` already holds this config's finished run, made by this code from
    these inputs; raise `RunDirError` when it holds another config's, or this config's made by
    other code or from other input files (`changed` says which)."""
    new, done = config_dict(cfg), read_done(run_dir)
    stored = _stored_config(run_dir)
    recorded = done.get("config_hash") if done else None
    if done == {} and stored is not None:
        recorded = config_hash(stored)  # DONE of an older mlpim: compare with its config.yaml
    if done is not None and recorded == config_hash(new):
        check_identity(cfg, run_dir, done)
        return True
    if done is None and stored is not None and config_hash(stored) == config_hash(new):
        return False  # this config's unfinished run (interrupted): run it again
    if done is None and stored is None and not (run_dir / C.METRICS).exists():
        return False
    what = "a finished" if done is not None else "an unfinished"
    old_exp = (stored or {}).get("experiment", done.get("experiment", "?") if done else "?")
    diff = config_diff(config_dict(stored), new) if stored else "no config.yaml to compare"
    error = RunDirError(
        f"{run_dir} holds {what} {old_exp} run with another config than this {cfg.experiment} "
        f"run ({diff}); refusing to mix them: {NEW_DIR_HINT}, or delete {run_dir}"
    )
    error.diff = diff
    raise error


def check_run_place(path: Path, sweep: bool = False) -> None:
    """Refuse, before anything is created, a run (or `sweep`) directory that the file system
    cannot hold (a folder name or path too long), that is a sweep folder (a sweep may go on in
    its own), or that is inside a finished run or a sweep folder: no command writes there."""
    path, key = Path(path), "hydra.sweep.dir" if sweep else "hydra.run.dir"
    name_max, path_max = _path_limits(path)
    long = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None or len(os.fsencode(str(path.absolute()))) >= path_max:
        what = f"a folder name of {len(long)} characters" if long else "the path is too long"
        raise MlpimError(
            f"{key}={str(path)[:60]}...: {what} (this file system allows {name_max} per folder "
            f"name, {path_max} in all): {NEW_DIR_HINT}"
        )
    owner = enclosing(path)
    if owner is None or owner == (path.absolute(), "sweep folder" if sweep else "finished run"):
        return  # a new directory; this run's own (skipped or refused by check_run_dir); a sweep's
    folder, what = owner
    where = "is" if folder == path.absolute() else f"is inside the {what}"
    raise MlpimError(
        f"{key}={path} {where} {folder if where != 'is' else 'a ' + what}; a finished run, a "
        f"sweep folder and anything inside them are never written by another command: "
        f"{NEW_DIR_HINT}"
    )


def _path_limits(path: Path) -> tuple[int, int]:
    """The longest folder name and path the file system holding `path` allows."""
    existing = next(p for p in [path.absolute(), *path.absolute().parents] if _exists(p))
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to look up
        return False


def check_identity(cfg: DictConfig, run_dir: Path, done: dict) -> None:
    """Raise `RunDirError` when this config's finished run in `run_dir` was made by other code
    (`changed="code"`) or from input files of other content (`changed="inputs"`)."""
    for changed, diff in (("code", code_change(done)), ("inputs", input_change(done, cfg))):
        if diff is None:
            continue
        error = RunDirError(
            f"{run_dir} holds a finished {cfg.experiment} run of this config, but {diff}; "
            f"refusing to overwrite it: {NEW_DIR_HINT}, or delete {run_dir}"
        )
        error.diff, error.changed = diff, changed
        raise error


def done_record(cfg: DictConfig, seconds: float) -> dict:
    """What DONE records about a finished run: the config hash, the code that ran it
    (`mlpim.identity.code_version`) and the SHA-256 of each input file."""
    return {
        "config_hash": config_hash(cfg),
        "experiment": cfg.experiment,
        **code_version(),
        "inputs": input_hashes(cfg),
        "seconds": round(seconds, 1),
    }


ACTIVE: dict = {"dir": None, "before": {}}  # the run this process is writing (for Ctrl-C)
HOUSEKEEPING = (C.RESOLVED_CONFIG, C.LOG, ".hydra")  # written before any result
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's console


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> pd.DataFrame | None:
    """Run one experiment into `run_dir`; None when this config already finished there.

    `overrides` (the command line's) are checked against what the experiment reads. The directory
    is locked while the run uses it (`mlpim.lock`); a refused run (another config's results, a
    run in progress there, a config preflight refuses) writes nothing into it."""
    run_dir = Path(run_dir)
    ACTIVE.update(dir=None)
    created = lock.make_dir(run_dir)
    lock.acquire(run_dir)
    try:
        directions = accept(cfg, run_dir, overrides, created)
        if directions is None:
            return None
        with reuse.session():  # within this run; `make paper` opens one around all its steps
            return run_accepted(cfg, run_dir, directions)
    finally:
        lock.release(run_dir)


def accept(
    cfg: DictConfig, run_dir: Path, overrides: list[str] | None, created: bool
) -> dict[str, Direction] | None:
    """The directions preflight loaded (config key -> `Direction`) when this config is to run in
    the locked `run_dir`, None when it already finished there; a refusal raises, and removes
    `run_dir` again when this run created it."""
    try:
        if check_run_dir(cfg, run_dir):
            log.info("skipping %s: this config already finished there", run_dir)
            return None
        directions = preflight(cfg, overrides)
        check_writable(run_dir)
    except MlpimError:
        if created:
            lock.remove_if_empty(run_dir)
        raise
    return directions


def check_writable(run_dir: Path) -> None:
    """A one-line error when this process cannot create files in `run_dir`."""
    if not os.access(run_dir, os.W_OK):
        raise MlpimError(
            f"cannot write to {run_dir}: permission denied or a read-only file system; choose a "
            "directory you can write (hydra.run.dir=DIR, or hydra.sweep.dir=DIR with -m)"
        )


def run_accepted(
    cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]
) -> pd.DataFrame:
    """Run into the locked, checked `run_dir` with the `directions` preflight loaded: config
    first, results, the log, DONE last."""
    (run_dir / C.METRICS).unlink(missing_ok=True)
    ACTIVE.update(dir=run_dir, before=results_in(run_dir))
    experiment = experiments.get_experiment(cfg.runner)
    io.write_config(cfg, run_dir)
    io.write_hydra_files(cfg, run_dir)
    run_log, saved = RunLog(run_dir / C.LOG), False
    try:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.model.get("dtype", "auto"), device)
        log.info("experiment %s on %s (%s, %s)", cfg.experiment, cfg.model.name, device, dtype)
        start = time.time()
        df = experiment.run(cfg, run_dir, directions)
        io.write_metrics(df, run_dir)
        saved = run_log.save()
        record = json.dumps(done_record(cfg, time.time() - start), indent=1) + "\n"
        io.write_text(record, run_dir, C.DONE)
    finally:
        run_log.close(save=not saved)
    ACTIVE.update(dir=None)  # left set when interrupted: the CLI reports it
    summarize = experiment.summarize or io.summary_table
    print_summary(cfg, summarize(df), run_dir, time.time() - start)
    return df


class RunLog:
    """The run's log (what the console shows), kept in memory and written to `path` atomically:
    when the run finishes, before DONE, or when it fails or is interrupted. A full disk cannot
    leave half a log (Hydra's own job log file is switched off: conf/hydra/job_logging)."""

    def __init__(self, path: Path):
        self.path, self.stream = Path(path), StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(self.handler)

    def save(self) -> bool:
        """Write what was logged so far to `path` (atomically); True."""
        io.atomic_write(self.path, lambda p: p.write_text(self.stream.getvalue()))
        return True

    def close(self, save: bool) -> None:
        """Stop logging here; `save` what was logged, never raising over the run's own error."""
        logging.getLogger().removeHandler(self.handler)
        if save:
            with suppress(OSError, MlpimError):
                self.save()


def results_in(run_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (mtime in ns, size) of the files in `run_dir` other than the housekeeping ones."""
    paths = Path(run_dir).iterdir() if Path(run_dir).is_dir() else []
    return {
        p.name: (p.stat().st_mtime_ns, p.stat().st_size)
        for p in paths
        if p.name not in HOUSEKEEPING
    }


def interrupted_message(run_dir: Path, before: dict[str, tuple[int, int]]) -> str:
    """What an interrupted run left in `run_dir`: nothing, or the complete files it wrote (new
    or changed since `before`, `results_in` when it started)."""
    now = results_in(run_dir)
    new = sorted(name for name, stat in now.items() if before.get(name) != stat)
    if not new:
        return f"interrupted; nothing was written to {run_dir} (no DONE)"
    shown = ", ".join(new[:4]) + (", ..." if len(new) > 4 else "")
    return (
        f"interrupted; {run_dir} holds an unfinished run (no DONE): its complete files {shown}, "
        "nothing half-written; the same command runs it again"
    )


def print_summary(cfg: DictConfig, table: pd.DataFrame, run_dir: Path, seconds: float) -> None:
    """Print the run's summary table, its directory and its report (verdict.md, summary.md)."""
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"\n{cfg.experiment} on {cfg.model.name} ({seconds:.0f} s)\n{table.round(3)}")
    print(f"\nrun directory: {run_dir}")
    report = next((run_dir / n for n in (C.VERDICT, C.SUMMARY) if (run_dir / n).is_file()), None)
    if report is not None:
        print(f"report: {report}")


@dataclass
class Result:
    """An experiment's outputs in memory: metrics, other tables (csv, md) and figures (PNG)."""

    metrics: pd.DataFrame
    tables: dict[str, pd.DataFrame | str] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # anything else (e.g. subspace.pt)


def run_experiment(cfg: DictConfig) -> Result:
    """Run the experiment of `cfg` and return its results; no files are left behind."""
    directions = preflight(cfg)
    with tempfile.TemporaryDirectory(prefix="mlpim_") as tmp:
        metrics = experiments.get_experiment(cfg.runner).run(cfg, Path(tmp), directions)
        result = Result(metrics=metrics)
        for path in sorted(Path(tmp).rglob("*")):
            name = path.relative_to(tmp).as_posix()
            if not path.is_file():
                continue
            if path.suffix == ".csv":
                result.tables[name] = pd.read_csv(path)
            elif path.suffix == ".md":
                result.tables[name] = path.read_text()
            elif path.suffix == ".png":
                result.figures[name] = path.read_bytes()
            else:
                result.files[name] = path.read_bytes()
    return result
