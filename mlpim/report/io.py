"""Writers: each takes the run directory as an argument and writes atomically.

A file appears complete or not at all: it is written to a hidden temporary file in the same
directory, then renamed over the target, so an interrupted run leaves no half-written table.
Importing this module changes no global state (the CLI chooses matplotlib's backend).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mlpim import constants as C


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def tidy(rows: list[dict], cfg: DictConfig) -> pd.DataFrame:
    """Metric rows -> the tidy table with model/experiment columns first."""
    df = pd.DataFrame(rows)
    df.insert(0, "experiment", cfg.experiment)
    df.insert(0, "model", cfg.model.name)
    cols = [c for c in C.METRIC_COLUMNS if c in df] + [c for c in df if c not in C.METRIC_COLUMNS]
    return df[cols]


def metric_rows(values: dict[str, float], **keys) -> list[dict]:
    """{metric: value} -> tidy rows sharing `keys` (intervention, site, layer, split ...)."""
    return [{**keys, "metric": m, "value": v} for m, v in values.items()]


def write_config(cfg: DictConfig, run_dir: Path) -> Path:
    return atomic_write(run_dir / C.RESOLVED_CONFIG, lambda p: OmegaConf.save(cfg, p, resolve=True))


def write_metrics(df: pd.DataFrame, run_dir: Path) -> Path:
    return atomic_write(run_dir / C.METRICS, lambda p: df.to_csv(p, index=False))


def write_text(text: str, run_dir: Path, name: str) -> Path:
    return atomic_write(run_dir / name, lambda p: p.write_text(text))


def save_figure(fig: plt.Figure, run_dir: Path, name: str) -> Path:
    path = atomic_write(run_dir / name, lambda p: fig.savefig(p, dpi=130, bbox_inches="tight"))
    plt.close(fig)
    return path


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
        path = self.dir / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / f"{key}.json", lambda p: p.write_text(json.dumps(value)))
