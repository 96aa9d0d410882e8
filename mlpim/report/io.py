"""Writers: each takes the run directory as an argument."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from mlpim import constants as C  # noqa: E402


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
    path = run_dir / C.RESOLVED_CONFIG
    OmegaConf.save(cfg, path, resolve=True)
    return path


def write_metrics(df: pd.DataFrame, run_dir: Path) -> Path:
    path = run_dir / C.METRICS
    df.to_csv(path, index=False)
    return path


def write_text(text: str, run_dir: Path, name: str) -> Path:
    path = run_dir / name
    path.write_text(text)
    return path


def save_figure(fig: plt.Figure, run_dir: Path, name: str) -> Path:
    path = run_dir / name
    fig.savefig(path, dpi=130, bbox_inches="tight")
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
