"""`mlpim collect DIR`: gather a sweep's per-job metrics into one table, summarize and plot it.

Every `metrics.csv` under DIR (any depth; hidden folders such as `.submitit/` are skipped) is
read and stacked into one tidy table with a `job` column (the job directory relative to DIR).
Hydra overrides that vary across jobs and have no column of their own (`method.lr=...`,
`method=das,mean_diff`) become columns named by their key, so that jobs stay distinguishable.
A missing `seed` column is filled from the job's resolved config.

Outputs, in DIR when it is a sweep folder (or any folder that is neither a finished run nor
inside one or a sweep folder), else next to the outermost finished run or sweep folder holding
it, in `<its name>_<path below it>_collected/` (a finished run and a sweep's jobs are never
written by another command), or in `--out OUT`: `collected.csv`, and per site kind `by_layer_<site>.png` (FLDD and IIA on the
test pairs vs layer, one line per intervention) and `by_dim_<site>.png` (the same vs the
subspace dimension), each line the mean over seeds with a ±1 std band. A plot whose x-axis would
hold a single value is skipped.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import yaml

from mlpim import constants as C
from mlpim import lock
from mlpim.errors import MlpimError
from mlpim.report import io
from mlpim.report.status import job_records, read_status

PLOT_METRICS = {"fldd": "FLDD", "iia": "IIA"}
# Interventions that do not depend on the subspace dimension (averaged over `dim` in plots),
# and those left out of the plots (the clean run: FLDD 0, no IIA).
DIM_FREE = {"full", "clean"}
NOT_PLOTTED = {"clean"}
# Override keys already represented by a metrics column.
OVERRIDE_COLUMNS = {"seed": "seed", "site.layer": "layer", "method.dim": "dim"}
NOT_GROUPED = {"job", "seed", "value"}
MULTIRUN = "multirun.yaml"  # Hydra's record of a sweep, written in its folder


class CollectError(MlpimError):
    """The directory does not exist or holds no metrics."""


def enclosing(path: Path) -> tuple[Path, str] | None:
    """(folder, what) of the outermost finished run (holding DONE) or sweep folder (holding
    multirun.yaml) that is or holds `path`; None when there is none."""
    path, found = Path(path).absolute(), None
    for folder in [path, *path.parents]:
        if (folder / C.DONE).is_file():
            found = (folder, "finished run")
        elif (folder / MULTIRUN).is_file():
            found = (folder, "sweep folder")
    return found


def out_dir(multirun_dir: Path, out: Path | None = None) -> Path:
    """Where collect writes: `out` (refused inside a finished run or a sweep folder), else
    `multirun_dir` when it is a sweep folder or outside both, else next to the one holding it."""
    path = Path(out if out is not None else multirun_dir)
    owner = enclosing(path)
    if owner is None or owner == (path.absolute(), "sweep folder"):
        return path
    folder, what = owner
    if out is not None:
        raise CollectError(
            f"--out {out} is inside the {what} {folder}, which no other command writes: "
            "choose a folder outside it"
        )
    name = "_".join(path.absolute().relative_to(folder.parent).parts)
    return folder.parent / f"{name}_collected"


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def metrics_files(multirun_dir: Path) -> list[Path]:
    """Every metrics.csv under `multirun_dir` outside hidden folders, in natural job order."""
    multirun_dir = Path(multirun_dir)
    if not multirun_dir.exists():
        raise CollectError(f"{multirun_dir} does not exist")
    if not multirun_dir.is_dir():
        raise CollectError(f"{multirun_dir} is not a directory")
    files = [
        p
        for p in multirun_dir.rglob(C.METRICS)
        if not any(part.startswith(".") for part in p.relative_to(multirun_dir).parts)
    ]
    if not files:
        bad = incomplete_jobs(multirun_dir)
        jobs = "; ".join(f"{job}: {why}" for job, why in bad.items())
        raise CollectError(f"no {C.METRICS} under {multirun_dir}" + (f" ({jobs})" if jobs else ""))
    return sorted(files, key=lambda p: _natural_key(p.relative_to(multirun_dir)))


def incomplete_jobs(multirun_dir: Path) -> dict[str, str]:
    """Jobs under `multirun_dir` without results: job -> why (its failure, or missing files)."""
    multirun_dir = Path(multirun_dir)
    out = {}
    for job, status in job_records(multirun_dir).items():  # jobs refused before they ran
        if status.get("status") == "failed" and not (multirun_dir / job / C.METRICS).exists():
            out[job] = f"failed: {status.get('reason', '')}"
    for marker in [*multirun_dir.rglob(".hydra"), *multirun_dir.rglob("status.json")]:
        job_dir = marker.parent
        rel = job_dir.relative_to(multirun_dir)
        if any(p.startswith(".") for p in rel.parts) or (job_dir / C.METRICS).exists():
            continue
        status = read_status(job_dir) or {}
        if status.get("status") == "failed":
            out[rel.as_posix()] = f"failed: {status.get('reason', '')}"
        else:
            out[rel.as_posix()] = f"missing: no {C.METRICS} (still running, or killed)"
    return dict(sorted(out.items(), key=lambda kv: _natural_key(Path(kv[0]))))


def _overrides(job_dir: Path) -> dict[str, str]:
    """The job's Hydra overrides (`.hydra/overrides.yaml`) as {key: value}."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _config_seed(job_dir: Path):
    path = job_dir / C.RESOLVED_CONFIG
    if not path.exists():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("seed")


def _as_number(values: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(values)
    except (ValueError, TypeError):
        return values


def gather(multirun_dir: Path) -> pd.DataFrame:
    """All jobs' metrics as one tidy table with a `job` column (no files written)."""
    multirun_dir = Path(multirun_dir)
    frames, overrides = [], {}
    for path in metrics_files(multirun_dir):
        job = path.parent.relative_to(multirun_dir).as_posix()
        try:
            df = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            print(f"mlpim collect: warning: {path} is empty; skipped", file=sys.stderr)
            continue
        if "seed" not in df:
            df["seed"] = _config_seed(path.parent)
        df.insert(0, "job", job)
        frames.append(df)
        overrides[job] = _overrides(path.parent)
    if not frames:
        raise CollectError(f"every {C.METRICS} under {multirun_dir} is empty")
    out = pd.concat(frames, ignore_index=True)
    # swept overrides without a column of their own become columns
    keys = sorted({k for o in overrides.values() for k in o})
    for key in keys:
        values = {job: o.get(key) for job, o in overrides.items()}
        if key in OVERRIDE_COLUMNS or key in out or len(set(values.values())) < 2:
            continue
        out[key] = _as_number(out.job.map(values))
    return out


def _test_rows(df: pd.DataFrame) -> pd.DataFrame:
    """FLDD and IIA rows on the test split (the `all` template where templates are listed)."""
    if not {"split", "metric", "intervention"} <= set(df):
        return df.iloc[:0]
    rows = df[(df.split == "test") & df.metric.isin(list(PLOT_METRICS))]
    if "template" in rows:
        rows = rows[rows.template.astype(str) == "all"]
    return rows.dropna(subset=["value"])


def _group_columns(df: pd.DataFrame) -> list[str]:
    """Columns that tell results apart (all but job/seed/value), those constant left out."""
    return [c for c in df if c not in NOT_GROUPED and df[c].nunique(dropna=False) > 1]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of FLDD and IIA on test, per intervention/site/layer/dim (+ swept)."""
    rows = _test_rows(df)
    if rows.empty:
        return pd.DataFrame()
    main = [c for c in ("site", "layer", "dim") if c in rows]
    extra = [c for c in _group_columns(rows) if c not in {*main, "intervention", "metric"}]
    keys = [*main, *extra, "intervention"]
    stats = rows.groupby([*keys, "metric"], dropna=False).value.agg(["mean", "std", "count"])
    std = stats["std"].fillna(0.0)
    text = stats["mean"].map("{:.3f}".format) + " ± " + std.map("{:.3f}".format)
    table = text.unstack("metric").rename(columns=PLOT_METRICS).fillna("-")
    table["seeds"] = stats["count"].unstack("metric").max(axis=1).astype(int)
    return table


def _line_groups(rows: pd.DataFrame, x: str, facet: list[str]):
    """(label, rows) per plotted line: an intervention and the other varying keys but x."""
    others = [c for c in _group_columns(rows) if c not in {x, "intervention", "metric", *facet}]
    for name, sub in rows.groupby("intervention", sort=False):
        if name in NOT_PLOTTED:
            continue
        keys = [c for c in others if not (c == "dim" and name in DIM_FREE)]
        if not keys:
            yield str(name), sub
            continue
        for values, g in sub.groupby(keys, dropna=False, sort=True):
            values = values if isinstance(values, tuple) else (values,)
            yield f"{name} " + ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)), g


def _plot_vs(rows: pd.DataFrame, x: str, title: str, xlabel: str) -> plt.Figure:
    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(11, 4), squeeze=False)
    for ax, (metric, name) in zip(axes[0], PLOT_METRICS.items(), strict=True):
        sub = rows[rows.metric == metric]
        for label, g in _line_groups(sub, x, facet=["site"]):
            stats = g.groupby(x).value.agg(["mean", "std"]).sort_index()
            std = stats["std"].fillna(0.0)
            (line,) = ax.plot(stats.index, stats["mean"], marker="o", label=label)
            ax.fill_between(
                stats.index,
                stats["mean"] - std,
                stats["mean"] + std,
                color=line.get_color(),
                alpha=0.2,
                lw=0,
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(1, color="gray", lw=0.8, ls="--")
        ax.set(title=f"{name} (test)", xlabel=xlabel, ylabel=name)
        values = sorted(rows[x].dropna().unique())
        if x == "dim" and values[0] > 0 and values[-1] / values[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title + " — mean ± std over seeds")
    fig.tight_layout()
    return fig


def plot(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """FLDD/IIA vs layer and vs dim per site kind (PNG files in `out_dir`); their paths."""
    rows = _test_rows(df)
    paths = []
    if rows.empty or "site" not in rows:
        return paths
    for site, sub in rows.groupby("site", sort=True):
        for x, xlabel in (("layer", "layer"), ("dim", "subspace dimension k")):
            if x not in sub or sub[x].nunique() < 2:
                continue
            seeds = sub.seed.nunique() if "seed" in sub else 1
            fig = _plot_vs(sub, x, f"{site}: {seeds} seed(s)", xlabel)
            paths.append(io.save_figure(fig, Path(out_dir), f"by_{x}_{site}.png"))
    return paths


def collect(multirun_dir: Path, out: Path | None = None) -> pd.DataFrame:
    """Gather every job's metrics under `multirun_dir`, write collected.csv and the plots where
    `out_dir` says."""
    df, _ = _collect(Path(multirun_dir), out)
    return df


def _collect(multirun_dir: Path, out: Path | None) -> tuple[pd.DataFrame, list[Path]]:
    if lock.is_locked(multirun_dir):
        raise CollectError(
            f"{multirun_dir} is in use by a running mlpim sweep; collect it when the sweep ends"
        )
    target = out_dir(multirun_dir, out)
    df = gather(multirun_dir)
    target.mkdir(parents=True, exist_ok=True)
    path = io.write_csv(df, target, C.COLLECTED)
    return df, [path, *plot(df, target)]


def collect_cli(argv: list[str]) -> None:
    """`mlpim collect DIR`: collect, summarize and plot a sweep; prints what it wrote."""
    parser = argparse.ArgumentParser(
        prog="mlpim collect", description="Gather a sweep's metrics.csv files into one table."
    )
    parser.add_argument("multirun_dir", type=Path, help="a sweep directory (searched recursively)")
    parser.add_argument(
        "--out", type=Path, help="where to write (default: the sweep folder, or next to a run)"
    )
    args = parser.parse_args(argv)
    try:
        df, paths = _collect(args.multirun_dir, args.out)
    except CollectError as e:
        print(f"mlpim: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"collected {df.job.nunique()} job(s), {len(df)} rows from {args.multirun_dir}")
    bad = incomplete_jobs(args.multirun_dir)
    if bad:
        print(f"\n{len(bad)} job(s) not collected:")
        for job, why in bad.items():
            print(f"  {job:>6}  {why}")
    table = summary(df)
    if table.empty:
        print("(no FLDD/IIA rows on the test split to summarize)")
    else:
        with pd.option_context("display.width", 160, "display.max_rows", 200):
            print(f"\nFLDD and IIA on test, mean ± std over seeds:\n{table}")
    print("\nwritten:")
    for p in paths:
        print(f"  {p}")
