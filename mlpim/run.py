"""`run(cfg)`: validate, dispatch to the experiment's runner, write the run directory."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from mlpim import constants as C
from mlpim.engine.models import resolve_device
from mlpim.experiments import get_runner
from mlpim.report import io

log = logging.getLogger("mlpim")


class RunDirError(RuntimeError):
    """The run directory already holds results."""


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame | None:
    """Run one experiment into `run_dir`; a finished directory (holding DONE) is skipped."""
    run_dir = Path(run_dir)
    if (run_dir / C.DONE).exists():
        log.info("skipping %s: already finished", run_dir)
        return None
    if (run_dir / C.METRICS).exists():
        raise RunDirError(f"{run_dir} already holds {C.METRICS}; refusing to overwrite it")
    run_dir.mkdir(parents=True, exist_ok=True)
    runner = get_runner(cfg.runner)
    io.write_config(cfg, run_dir)
    log.info("experiment %s on %s (%s)", cfg.experiment, cfg.model.name, resolve_device(cfg.device))
    start = time.time()
    df = runner(cfg, run_dir)
    io.write_metrics(df, run_dir)
    (run_dir / C.DONE).write_text(f"{time.time() - start:.1f} s\n")
    summarize = getattr(sys.modules[runner.__module__], "summarize", io.summary_table)
    print_summary(cfg, summarize(df), run_dir, time.time() - start)
    return df


def print_summary(cfg: DictConfig, table: pd.DataFrame, run_dir: Path, seconds: float) -> None:
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"\n{cfg.experiment} on {cfg.model.name} ({seconds:.0f} s)\n{table.round(3)}")
    print(f"\nrun directory: {run_dir}")
