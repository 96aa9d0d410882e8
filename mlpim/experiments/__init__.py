"""Experiments: one module per runner named in `conf/experiment/*.yaml` (`runner:`).

Each module declares its one `EXPERIMENT = Experiment(run=..., options=..., ...)`: `run(cfg,
run_dir, directions) -> metrics DataFrame` (the `Direction`s preflight loaded, by config key), its options dataclass (`extra.*`, in `mlpim.options` and its
`OPTIONS`), its `summarize` (None: the generic summary table), the config keys of the files it
reads (`identity.input_files`), whether it checks one direction rather than a subspace and its
options that must be positive (`mlpim.preflight`). `get_experiment(name)` imports that one
module only. `common` holds the steps runners share; no experiment module imports another.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

Runner = Callable[["DictConfig", Path, Mapping], "pd.DataFrame"]  # (cfg, run_dir, directions)
SHARED = ("common", "options")  # modules of this package that are not experiments


@dataclass(frozen=True)
class Experiment:
    """What an experiment module declares: how it runs, and what preflight and a run's identity
    need to know of it without running it."""

    run: Runner
    options: type  # its options dataclass (`extra.*`): `mlpim.options.OPTIONS[runner]`
    summarize: Callable[[pd.DataFrame], pd.DataFrame] | None = None  # None: io.summary_table
    # config key -> the files it names: None, the file (or folder) itself; else the file name or
    # glob of what is read in the run folder it names
    inputs: Mapping[str, str | None] = field(default_factory=dict)
    # checks one direction or subspace (`direction=`) of at most max_k dimensions at the site and
    # layer it was found at (None: takes no direction to check)
    max_k: int | None = None
    positive: tuple[str, ...] = ()  # options that must be positive (at least 1 if not float)


def runner_names() -> list[str]:
    """Modules of this package that define an experiment runner."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED)


def get_experiment(name: str) -> Experiment:
    """The `EXPERIMENT` of the experiment module `name` (only that module is imported)."""
    if name not in runner_names():
        raise KeyError(f"unknown runner {name!r}; available: {', '.join(runner_names())}")
    return importlib.import_module(f"{__name__}.{name}").EXPERIMENT
