"""Writers: each takes the run directory as an argument and writes atomically.

A file appears complete or not at all (`mlpim.files.atomic_write`): it is written to a hidden
temporary file in the same directory, then renamed over the target, so an interrupted run or a
full disk leaves no half-written table. Importing this module changes no global state (the CLI
chooses matplotlib's backend).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mlpim import constants as C
from mlpim.analysis.rows import metric_rows
from mlpim.files import atomic_write, save_torch, write_bytes

__all__ = ["atomic_write", "metric_rows", "save_torch", "write_bytes"]  # for the runners


def tidy(rows: list[dict], cfg: DictConfig) -> pd.DataFrame:
    """Metric rows -> the tidy table with model/experiment columns first."""
    df = pd.DataFrame(rows)
    df.insert(0, "experiment", cfg.experiment)
    df.insert(0, "model", cfg.model.name)
    cols = [c for c in C.METRIC_COLUMNS if c in df] + [c for c in df if c not in C.METRIC_COLUMNS]
    return df[cols]


def write_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The resolved config as `run_dir/config.yaml`; returns its path."""
    return atomic_write(run_dir / C.RESOLVED_CONFIG, lambda p: OmegaConf.save(cfg, p, resolve=True))


def write_metrics(df: pd.DataFrame, run_dir: Path) -> Path:
    """The tidy metrics as `run_dir/metrics.csv`; returns its path."""
    return atomic_write(run_dir / C.METRICS, lambda p: df.to_csv(p, index=False))


def write_text(text: str, run_dir: Path, name: str) -> Path:
    """`text` as `run_dir/name`; returns its path."""
    return atomic_write(run_dir / name, lambda p: p.write_text(text))


def write_csv(df: pd.DataFrame, run_dir: Path, name: str) -> Path:
    """A table (without its index) as `run_dir/name`."""
    return atomic_write(run_dir / name, lambda p: df.to_csv(p, index=False))


def save_figure(fig: plt.Figure, run_dir: Path, name: str) -> Path:
    """`fig` as a PNG at `run_dir/name` (then closed); returns its path."""
    try:
        return atomic_write(run_dir / name, lambda p: fig.savefig(p, dpi=130, bbox_inches="tight"))
    finally:
        plt.close(fig)


def write_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra's record of the job in `run_dir/.hydra/` (config, hydra, overrides), when running
    under Hydra. mlpim writes it itself (`hydra.output_subdir: null`), once the run directory is
    locked and accepted, so that a refused run leaves it untouched."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = Path(run_dir) / ".hydra"
    out.mkdir(exist_ok=True)
    files = {
        "config.yaml": cfg,
        "hydra.yaml": OmegaConf.create({"hydra": hc}),
        "overrides.yaml": hc.overrides.task,
    }
    for name, node in files.items():
        atomic_write(out / name, lambda p, node=node: OmegaConf.save(node, p))


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows interventions; columns metric per split (the table printed at the end of a run)."""
    if "template" in df:
        df = df[df.template == "all"]
    wide = df.pivot_table(
        index="intervention", columns=["split", "metric"], values="value", sort=False
    )
    wide.columns = [f"{m} ({s})" for s, m in wide.columns]
    return wide


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub markdown table (index as the first column)."""
    cols = [df.index.name or "", *map(str, df.columns)]

    def fmt(v) -> str:
        if isinstance(v, float):
            return "—" if v != v else f"{v:.{digits}f}"  # NaN: not measured / not applicable
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [
        "| " + " | ".join([str(i), *map(fmt, row)]) + " |"
        for i, row in zip(df.index, df.values, strict=True)
    ]
    return "\n".join(lines)


class JsonStore:
    """A directory of JSON files keyed by content hash (measured references shared between runs);
    a missing or unreadable entry reads as None, a new one is written atomically."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def get(self, key: str) -> dict | None:
        """The entry stored under `key`, or None."""
        try:
            return json.loads((self.dir / f"{key}.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict) -> None:
        """Store `value` under `key` (atomically)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / f"{key}.json", lambda p: p.write_text(json.dumps(value)))
