"""How each job of a sweep ended: the status records `mlpim.sweep` writes, read back.

A job that ran in its directory records `status.json` there; a skipped or refused job leaves
its directory alone and records `<job>.json` in the sweep directory's `.status/` instead.
"""

from __future__ import annotations

import json
from pathlib import Path

STATUS = "status.json"
RECORDS = ".status"  # in the sweep directory: statuses of jobs that left their directory alone


def read_status_file(path: Path) -> dict | None:
    """A status record; None when absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_status(job_dir: Path) -> dict | None:
    """The status record in a job's directory; None when absent or unreadable."""
    return read_status_file(Path(job_dir) / STATUS)


def job_records(sweep_dir: Path) -> dict[str, dict]:
    """job -> status of the jobs that recorded it in the sweep directory (`.status/`)."""
    out = {}
    for path in sorted((Path(sweep_dir) / RECORDS).glob("*.json")):
        status = read_status_file(path)
        if status is not None:
            out[status.get("job", path.stem)] = status
    return out
