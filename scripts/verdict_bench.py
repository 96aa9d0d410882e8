"""`make verdict-bench`: illusion_benchmark on every model × task, resumable, and one report.

usage: python scripts/verdict_bench.py [--models M[,M]] [--tasks T[,T]] [--out DIR]
                                       [--report-only] [overrides]

Each part (one model × task) runs into DIR/<model>-<task>/ (default outputs/verdict-bench) as
`mlpim run experiment=illusion_benchmark model=M dataset=T` would. A part finished with the same
config, code and inputs is skipped, so an interrupted run resumes; a part of other code is refused
before any work (choose another --out, or delete it). DIR/REPORT.md then merges the parts'
cases.csv: the rates per model × task and, per model, the held-out tasks pooled, with exact 95%
intervals; each part's split (calibration: SmolLM2 × IOI) and wall time; the cases by kind, the
misses with their reasons, the refused edits, the ROC. Parts made under different rule hashes are
reported apart, never pooled: a held-out rate stands only with the frozen hash.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib
import pandas as pd

from mlpim.config import compose
from mlpim.report import bench
from mlpim.report.io import markdown_table, write_csv, write_text
from mlpim.run import RunDirError, read_done, run

MODELS = ("smollm2-135m", "gemma3-270m")
TASKS = ("ioi", "facts", "pronouns")
CASES = "cases.csv"
SAME_CASE = ["model", "task", "seed", "rule", "layer", "site", "case"]  # whichever part ran it


def run_part(model: str, task: str, out: Path, overrides: list[str]) -> float:
    """Run (or skip) one part; its recorded wall time in seconds."""
    part = out / f"{model}-{task}"
    print(f"\n=== {part.name}", flush=True)
    cfg = compose(
        ["experiment=illusion_benchmark", f"model={model}", f"dataset={task}", *overrides]
    )
    start = time.time()
    try:
        if run(cfg, part) is None:
            print(f"{part.name}: finished before with this config, code and inputs; skipped")
    except RunDirError as e:
        sys.exit(f"verdict-bench: error: {e}")
    seconds = (read_done(part) or {}).get("seconds")
    return float(seconds) if isinstance(seconds, int | float) else time.time() - start


def merged(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every finished part's cases, one row per part: model, task, hash, cases, wall time)."""
    tables, parts = [], []
    for path in sorted(out.glob(f"*/{CASES}")):
        done = read_done(path.parent)
        if done is None:
            continue
        t = pd.read_csv(path)
        tables.append(t)
        parts.append(
            {
                "part": path.parent.name,
                "model": t.model.iloc[0],
                "task": t.task.iloc[0],
                "rule hash": t.rule.iloc[0],
                "cases": len(t),
                "wall time (min)": round(float(done.get("seconds", float("nan"))) / 60, 1),
            }
        )
    cases = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return once(cases), pd.DataFrame(parts)


def once(cases: pd.DataFrame) -> pd.DataFrame:
    """Each case counted once: a case that several parts measured (the same model, task, seed,
    rule, layer, site and name, as a part re-run with other sweeps repeats its unedited cases) keeps
    its first part's row; repeats that disagree on the verdict stop the report."""
    if cases.empty:
        return cases
    cases = cases.assign(seed=cases.get("seed", pd.Series(0, index=cases.index)).fillna(0))
    repeats = cases[cases.duplicated(SAME_CASE, keep=False)]
    labels = repeats.fillna({"verdict": ""}).groupby(SAME_CASE).verdict.nunique()
    if (labels > 1).any():
        names = ", ".join(str(k[-1]) for k in labels[labels > 1].index[:3])
        sys.exit(f"verdict-bench: error: parts measured the same case with other verdicts: {names}")
    return cases.drop_duplicates(SAME_CASE, ignore_index=True)


def report(out: Path) -> Path:
    """DIR/REPORT.md, DIR/cases.csv and the plots from the finished parts."""
    cases, parts = merged(out)
    if cases.empty:
        sys.exit(f"verdict-bench: error: no finished part under {out}")
    write_csv(cases, out, CASES)
    pages, apart = [], cases.rule.nunique() > 1  # several hashes: each its own plots
    for rule, table in cases.groupby("rule"):
        names = ", ".join(parts[parts["rule hash"] == rule].part)
        page = bench.markdown(f"parts: {names}", table).replace("# illusion_benchmark\n\n", "", 1)
        pages.append(f"## Rule hash {rule}\n\n" + page.replace("\n#", "\n##"))
        where = out / f"rule-{rule}" if apart else out
        where.mkdir(exist_ok=True)
        bench.plots(table, where, f"verdict benchmark ({rule})")
    text = "# The verdict's power: illusion_benchmark over models × tasks\n\n## Parts\n\n"
    text += markdown_table(parts.set_index("part")) + "\n\n" + wall_times(parts) + "\n\n"
    if (repeats := int(parts.cases.sum()) - len(cases)) > 0:
        print(f"{repeats} repeated cases counted once", flush=True)
        text += f"{repeats} cases measured by more than one part (the same model, task, seed,"
        text += " rule, layer, site and name, with the same verdict) are counted once.\n\n"
    text += "\n\n".join(pages)
    write_text(text, out, "REPORT.md")
    return out / "REPORT.md"


def wall_times(parts: pd.DataFrame) -> str:
    """One line: the parts' wall time summed per model."""
    per = parts.groupby("model")["wall time (min)"].agg(["sum", "size"])
    said = [
        f"{m} {s:.1f} min over {n} parts"
        for m, s, n in zip(per.index, per["sum"], per["size"], strict=True)
    ]
    return "Wall time per model: " + "; ".join(said) + "."


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--out", default="outputs/verdict-bench")
    p.add_argument("--report-only", action="store_true")
    args, overrides = p.parse_known_args(argv)
    matplotlib.use("Agg")
    out = Path(args.out)
    if not args.report_only:
        for model in args.models.split(","):
            for task in args.tasks.split(","):
                run_part(model, task, out, overrides)
    print(f"report: {report(out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
