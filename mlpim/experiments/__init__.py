"""Experiments: one module per runner named in `conf/experiment/*.yaml` (`runner:`).

Each module has `run(cfg, run_dir) -> metrics DataFrame` (and optionally `summarize`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

Runner = Callable[[DictConfig, Path], pd.DataFrame]


def runner_names() -> list[str]:
    """Modules of this package that define an experiment runner."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common")


def get_runner(name: str) -> Runner:
    """The `run` function of the experiment module `name`."""
    if name not in runner_names():
        raise KeyError(f"unknown runner {name!r}; available: {', '.join(runner_names())}")
    return importlib.import_module(f"{__name__}.{name}").run
