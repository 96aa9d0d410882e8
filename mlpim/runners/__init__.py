"""Registry of experiment runners: name -> `run(cfg, run_dir) -> metrics DataFrame`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

RUNNERS = {
    "ioi_baseline": "mlpim.runners.baseline",
    "ioi_locate": "mlpim.runners.locate",
    "ioi_path_patching": "mlpim.runners.path_patching",
    "ioi_nullspace": "mlpim.runners.nullspace",
    "ioi_alignment": "mlpim.runners.alignment",
    "subspace": "mlpim.runners.subspace",
    "toy_illusion": "mlpim.runners.toy",
    "ioi_dormant": "mlpim.runners.dormant",
    "ioi_random_mlp": "mlpim.runners.random_mlp",
    "mlp_recovery": "mlpim.runners.recovery",
    "ioi_neuron_budget": "mlpim.runners.neuron_budget",
    "illusion_check": "mlpim.runners.illusion_check",
}

Runner = Callable[[DictConfig, Path], pd.DataFrame]


def get_runner(name: str) -> Runner:
    """The runner function registered under `name`."""
    if name not in RUNNERS:
        raise KeyError(f"unknown runner {name!r}; registered: {', '.join(sorted(RUNNERS))}")
    return importlib.import_module(RUNNERS[name]).run
