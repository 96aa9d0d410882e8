"""Sweeps that report: each job writes `status.json` in its directory (finished, skipped or
failed, with a one-line reason), and the `SweepReport` Hydra callback prints a table of this
sweep's jobs at the end of `mlpim run -m`, in the launching process, whatever the launcher.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mlpim.errors import MlpimError
from mlpim.report import io

log = logging.getLogger("mlpim")

STATUS = "status.json"
LAST: dict = {"failed": 0}  # the last sweep's counts in this process (read by the CLI)


def write_status(job_dir: Path, status: str, overrides: list[str], reason: str = "") -> None:
    record = {"status": status, "reason": reason, "overrides": overrides, "time": time.time()}
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    io.write_text(json.dumps(record) + "\n", Path(job_dir), STATUS)


def read_status(job_dir: Path) -> dict | None:
    try:
        return json.loads((Path(job_dir) / STATUS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (
        text[0] if isinstance(e, MlpimError) and text else f"{type(e).__name__}: {' '.join(text)}"
    )


def run_job(cfg: DictConfig, job_dir: Path, overrides: list[str]) -> None:
    """One sweep job: run it and record how it ended; a failure does not stop the sweep.

    A user mistake prints one line; any other exception also prints its traceback."""
    from mlpim.run import run

    try:
        df = run(cfg, job_dir, overrides)
    except Exception as e:
        if not isinstance(e, MlpimError):
            traceback.print_exc()
        print(f"mlpim: error: {one_line(e)}", file=sys.stderr)
        write_status(job_dir, "failed", overrides, one_line(e))
        return
    write_status(job_dir, "skipped" if df is None else "finished", overrides)


def sweep_jobs(sweep_dir: Path, since: float) -> list[tuple[str, dict]]:
    """(job, status) of the jobs under `sweep_dir` started at or after `since`."""
    rows = []
    for hydra_dir in sorted(Path(sweep_dir).rglob(".hydra")):
        job_dir = hydra_dir.parent
        if (hydra_dir / "hydra.yaml").stat().st_mtime < since - 1:
            continue
        status = read_status(job_dir)
        if status is None or status["time"] < since - 1:
            status = {"status": "failed", "reason": "no status: the job died (killed?)"}
        rows.append((job_dir.relative_to(sweep_dir).as_posix(), status))
    return sorted(rows, key=lambda r: [int(t) if t.isdigit() else t for t in r[0].split("/")])


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
    """Hydra callback (`hydra.callbacks.sweep_report` in conf/config.yaml)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.start = time.time()
        LAST.update(failed=0)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        print(report(Path(config.hydra.sweep.dir), getattr(self, "start", 0.0)), flush=True)
