"""Experiments: one module per runner named in `conf/experiment/*.yaml` (`runner:`).

Each module has `run(cfg, run_dir) -> metrics DataFrame` (and optionally `summarize`); its options
(`extra.*`) are its dataclass in `mlpim.options`. `common` holds the steps runners
share; no experiment module imports another.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

Runner = Callable[["DictConfig", Path], "pd.DataFrame"]
SHARED = ("common", "options")  # modules of this package that are not experiments


def runner_names() -> list[str]:
    """Modules of this package that define an experiment runner."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED)


def get_runner(name: str) -> Runner:
    """The `run` function of the experiment module `name`."""
    if name not in runner_names():
        raise KeyError(f"unknown runner {name!r}; available: {', '.join(runner_names())}")
    return importlib.import_module(f"{__name__}.{name}").run
