"""Sweeps that report: each job records how it ended (finished, skipped or failed, with a one-line
reason), and the `SweepReport` Hydra callback prints a table of this sweep's jobs at the end of
`mlpim run -m`, in the launching process, whatever the launcher.

A job that ran in its directory records `status.json` there. A job that left its directory
alone (skipped: it holds this config's finished run; refused: it holds another run, or is in
use) records its status in the sweep directory's `.status/` instead, so that a finished run's
files never change. The sweep directory is locked while the sweep runs (`mlpim.lock`), and a
sweep whose jobs would be refused is refused whole, before anything is written (`check_sweep`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from contextlib import suppress
from pathlib import Path

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlpim import lock
from mlpim.errors import MlpimError
from mlpim.lock import RunDirLocked
from mlpim.report import io
from mlpim.report.status import RECORDS, STATUS, job_records, read_status
from mlpim.run import ACTIVE, RunDirError, check_run_dir, check_run_place, run

log = logging.getLogger("mlpim")

LAST: dict = {"failed": 0}  # the last sweep's counts in this process (read by the CLI)


def write_status(
    job_dir: Path, status: str, overrides: list[str], reason: str = "", own_dir: bool = True
) -> None:
    """Record how a job ended: in its directory when it ran there (`own_dir`), else in the
    sweep directory's `.status/` (a skipped or refused job never writes into its directory)."""
    record = {"status": status, "reason": reason, "overrides": overrides, "time": time.time()}
    if own_dir:
        Path(job_dir).mkdir(parents=True, exist_ok=True)
        io.write_text(json.dumps(record) + "\n", Path(job_dir), STATUS)
        return
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    job = Path(job_dir).resolve().relative_to(sweep_dir.resolve()).as_posix()
    (sweep_dir / RECORDS).mkdir(exist_ok=True)
    name = job.replace("/", "_") + ".json"
    io.write_text(json.dumps({**record, "job": job}) + "\n", sweep_dir / RECORDS, name)


def one_line(e: BaseException) -> str:
    """An exception as one line: a user mistake's message, else its type and text."""
    text = str(e).strip().splitlines()
    return (
        text[0] if isinstance(e, MlpimError) and text else f"{type(e).__name__}: {' '.join(text)}"
    )


def run_job(cfg: DictConfig, job_dir: Path, overrides: list[str]) -> None:
    """One sweep job: run it and record how it ended; a failure does not stop the sweep.

    A user mistake prints one line; any other exception also prints its traceback."""
    try:
        df = run(cfg, job_dir, overrides)
    except Exception as e:
        if not isinstance(e, MlpimError):
            traceback.print_exc()
        print(f"mlpim: error: {one_line(e)}", file=sys.stderr)
        accepted = ACTIVE["dir"] is not None  # else refused: its directory is left as it was
        if not accepted:
            with suppress(OSError):
                Path(job_dir).rmdir()  # only when empty: the one Hydra made for this job
        write_status(job_dir, "failed", overrides, one_line(e), own_dir=accepted)
        return
    write_status(
        job_dir, "skipped" if df is None else "finished", overrides, own_dir=df is not None
    )


def sweep_jobs(sweep_dir: Path, since: float) -> list[tuple[str, dict]]:
    """(job, status) of the jobs under `sweep_dir` started at or after `since`."""
    sweep_dir, rows = Path(sweep_dir), {}
    for path in sorted(sweep_dir.rglob(STATUS)):
        status = read_status(path.parent)
        if status is not None and status["time"] >= since - 1:
            rows[path.parent.relative_to(sweep_dir).as_posix()] = status
    for job, status in job_records(sweep_dir).items():
        if status["time"] >= since - 1:
            rows[job] = status
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        job = hydra_dir.parent.relative_to(sweep_dir).as_posix()
        if job not in rows and (hydra_dir / "hydra.yaml").stat().st_mtime >= since - 1:
            rows[job] = {"status": "failed", "reason": "no status: the job died (killed?)"}
    return sorted(
        rows.items(), key=lambda r: [int(t) if t.isdigit() else t for t in r[0].split("/")]
    )


def varying(rows: list[tuple[str, dict]]) -> dict[str, str]:
    """job -> its overrides that differ between the jobs (what tells them apart)."""
    overrides = {job: r.get("overrides", []) for job, r in rows}
    counts: dict[str, int] = {}
    for items in overrides.values():
        for o in items:
            counts[o] = counts.get(o, 0) + 1
    return {
        job: " ".join(o for o in items if counts[o] < len(rows)) for job, items in overrides.items()
    }


def report(sweep_dir: Path, since: float) -> str:
    """The table printed at the end of a sweep; LAST holds its counts."""
    rows = sweep_jobs(sweep_dir, since)
    counts = {s: sum(r["status"] == s for _, r in rows) for s in ("finished", "skipped", "failed")}
    LAST.update(counts)
    lines = [f"\nsweep {sweep_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    for job, r in rows:
        reason = f"  {r['reason']}" if r.get("reason") else ""
        lines.append(f"  {job:>6}  {r['status']:8s}  {varying(rows).get(job, '')}{reason}")
    return "\n".join(lines)


class SweepReport(Callback):
    """Hydra callback (`hydra.callbacks.sweep_report` in conf/config.yaml): locks and checks the
    sweep directory before the sweeper writes anything, prints the table at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Lock the sweep directory and refuse a sweep whose jobs cannot run there."""
        self.start = time.time()
        LAST.update(failed=0)
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            check_jobs(config)
            check_run_place(sweep_dir, sweep=True)
            lock.make_dir(sweep_dir)
            lock.acquire(sweep_dir, what="sweep")
            check_sweep(config, sweep_dir)
        except MlpimError as e:
            lock.release(sweep_dir)
            lock.remove_if_empty(sweep_dir)
            print(f"mlpim: error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """Print the table of finished, skipped and failed jobs; unlock."""
        print(report(Path(config.hydra.sweep.dir), getattr(self, "start", 0.0)), flush=True)
        lock.release(Path(config.hydra.sweep.dir))


class RunDirCheck(Callback):
    """Hydra callback (`hydra.callbacks.run_dir`): creates the run directory before Hydra does,
    so that one that cannot be created is one line (exit 2), not Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        """Create `hydra.run.dir`, or stop with one line (exit 2)."""
        try:
            check_run_place(Path(config.hydra.run.dir))
            lock.make_dir(Path(config.hydra.run.dir))
        except MlpimError as e:
            print(f"mlpim: error: {e}", file=sys.stderr)
            sys.exit(2)


def sweep_overrides(config: DictConfig) -> list[list[str]] | None:
    """Each job's task overrides, in job order, as the basic sweeper makes them; None for
    another sweeper."""
    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
        return None
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_jobs(config: DictConfig) -> None:
    """Refuse a sweep without jobs: an override that sweeps over no value (`range(5,2)`)."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    empty = [
        o.input_line
        for o in parsed
        if o.is_sweep_override() and not list(o.sweep_string_iterator())
    ]
    if empty:
        raise MlpimError(
            f"{', '.join(empty)} sweeps over no value: this sweep has no jobs to run; give at "
            "least one value (a range's start below its stop)"
        )


def check_sweep(config: DictConfig, sweep_dir: Path) -> None:
    """Refuse the whole sweep, before any file is written, when a job directory it would use
    holds another config's results or is in use by another run."""
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    jobs = sweep_overrides(config) if subdir == "${hydra.job.num}" else None
    for num, overrides in enumerate(jobs or []):
        job_dir = sweep_dir / str(num)
        if not job_dir.is_dir() or not any(job_dir.iterdir()):
            continue
        if lock.is_locked(job_dir):
            raise RunDirLocked(
                f"job {num} of this sweep: {job_dir} is in use by another mlpim run right now; "
                "wait until it ends, or choose a new directory (hydra.sweep.dir=DIR)"
            )
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except Exception:  # a job that cannot compose reports itself when it runs
            continue
        try:
            check_run_dir(cfg, job_dir)
        except RunDirError as e:
            raise RunDirError(
                f"{sweep_dir} holds another sweep: its job {num} ran another config than this "
                f"sweep's job {num} ({e.diff}); refusing to mix them: choose a new directory "
                f"(hydra.sweep.dir=DIR), or delete {sweep_dir}"
            ) from None
