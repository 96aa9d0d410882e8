"""`make paper`: run every experiment of the paper in order and write REPORT.md.

usage: python scripts/paper.py [--only STEP[,STEP]] [--out DIR] [--beside DIR[,DIR]] [--report-only]
                              model=smollm2-135m [overrides]

Each step writes `outputs/paper/<model>/<experiment>/`; a step finished with the same config,
code and input files (DONE records them) is not re-run, so an interrupted `make paper` resumes.
A step whose directory holds a run of another config (e.g. `ARGS=method.epochs=5` after a full
run) or of other code (mlpim's files changed) is refused before any work: choose another `--out`
or delete it. Directions are reused: the residual and MLP DAS directions trained by the first
steps are passed to every later analysis; a finished step whose input direction has changed since
(its upstream step re-ran) is re-run, its old results moved to `superseded/<step>-<time>/`. The
report puts each number of the paper (GPT-2 small) next to the measured one, and next to the
other models' (`--beside DIRS`; by default every other model's directory under outputs/paper/),
with each step's wall time per model; `--report-only` rewrites REPORT.md from the finished steps.
Steps share work by content hash in one process (`mlpim.reuse`: the model, prepared pairs, DAS
and random-MLP runs); MLPIM_REUSE=0 turns that off. An `extra.*` override goes to the steps whose
experiment has that option (one no step has is refused).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import matplotlib
import pandas as pd

from mlpim import constants as C
from mlpim import reuse
from mlpim.config import CONF_DIR, compose, experiment_runners
from mlpim.errors import MlpimError
from mlpim.identity import input_hashes
from mlpim.options import OPTIONS, option_names
from mlpim.preflight import override_key
from mlpim.report.io import markdown_table
from mlpim.run import RunDirError, check_run_dir, read_done, run

NAN = float("nan")
RESID = "{out}/ioi_resid8_das/" + C.DIRECTION
MLP = "{out}/ioi_mlp8_das/" + C.DIRECTION
WITH_BOTH = [f"direction={MLP}", f"extra.resid_direction={RESID}"]
# (step = its directory under outputs/paper/<model>/, experiment, overrides)
STEPS: list[tuple[str, str, list[str]]] = [
    ("ioi_baseline", "ioi_baseline", []),
    ("ioi_locate", "ioi_locate", []),
    ("ioi_resid8_das", "ioi_resid8_das", []),
    ("ioi_mlp8_das", "ioi_mlp8_das", []),
    ("ioi_mean_diff", "ioi_mean_diff", [f"direction={RESID}"]),
    ("ioi_nullspace", "ioi_nullspace", [f"direction={MLP}"]),
    ("ioi_alignment", "ioi_alignment", WITH_BOTH),
    ("ioi_dormant", "ioi_dormant", WITH_BOTH),
    ("ioi_path_patching", "ioi_path_patching", WITH_BOTH),
    ("ioi_random_mlp", "ioi_random_mlp", [f"direction={MLP}"]),
    ("illusion_check", "illusion_check", WITH_BOTH),
    ("illusion_check_resid", "illusion_check", [f"direction={RESID}"]),  # the real direction
    ("toy_illusion", "toy_illusion", []),
    ("mlp_recovery", "mlp_recovery", []),
    ("ioi_neuron_budget", "ioi_neuron_budget", []),
    ("ioi_layer_profile", "ioi_layer_profile", []),
    ("illusion_benchmark", "illusion_benchmark", []),
    ("fact_patching", "fact_patching", []),
    ("fact_editing", "fact_editing", ["extra.pair_run={out}/fact_patching"]),
]

# (quantity, paper value on GPT-2 small, step, filters on its metrics.csv)
# a table: the formatter would give each entry five lines; two read better
# fmt: off
COMPARE: list[tuple[str, str, str, dict]] = [
    ("clean IOI accuracy", "0.916", "ioi_baseline",
     dict(metric="accuracy", split="test", template="all")),
    ("clean logit difference", "3.36", "ioi_baseline",
     dict(metric="logit_diff", split="test", template="all")),
    ("full MLP patch: FLDD", "-0.08", "ioi_mlp8_das",
     dict(intervention="full", metric="fldd", split="test")),
    ("full MLP patch: IIA", "0.000", "ioi_mlp8_das",
     dict(intervention="full", metric="iia", split="test")),
    ("v_MLP (DAS in the MLP): FLDD", "0.467", "ioi_mlp8_das",
     dict(intervention="das", metric="fldd", split="test")),
    ("v_MLP: IIA", "0.042", "ioi_mlp8_das",
     dict(intervention="das", metric="iia", split="test")),
    ("v_MLP row-space part: FLDD", "0.135", "ioi_nullspace",
     dict(intervention="row_proj", metric="fldd", split="test")),
    ("v_MLP row-space part: IIA", "0.002", "ioi_nullspace",
     dict(intervention="row_proj", metric="iia", split="test")),
    ("v_MLP nullspace part: FLDD", "0.00", "ioi_nullspace",
     dict(intervention="null_proj", metric="fldd", split="test")),
    ("‖row-space part‖² of v_MLP", "0.567 (0.753²)", "ioi_nullspace",
     dict(intervention="row_proj", metric="norm_sq")),
    ("‖nullspace part‖² of v_MLP", "0.432 (0.657²)", "ioi_nullspace",
     dict(intervention="null_proj", metric="norm_sq")),
    ("full resid patch: FLDD", "1.236", "ioi_resid8_das",
     dict(intervention="full", metric="fldd", split="test")),
    ("full resid patch: IIA", "0.548", "ioi_resid8_das",
     dict(intervention="full", metric="iia", split="test")),
    ("v_resid (DAS in resid): FLDD", "1.407", "ioi_resid8_das",
     dict(intervention="das", metric="fldd", split="test")),
    ("v_resid: IIA", "0.748", "ioi_resid8_das",
     dict(intervention="das", metric="iia", split="test")),
    ("v_resid: flip rate", "~0.8 (post)", "ioi_resid8_das",
     dict(intervention="das", metric="flip_rate", split="test")),
    ("cos(mean-diff, v_resid)", "0.83-0.85", "ioi_mean_diff",
     dict(intervention="mean_diff", metric="cosine_with_das")),
    ("random MLP control: FLDD", "> v_MLP's", "ioi_random_mlp",
     dict(intervention="random_mlp", metric="fldd", split="test")),
    ("random MLP control: IIA", "—", "ioi_random_mlp",
     dict(intervention="random_mlp", metric="iia", split="test")),
    ("abs cos(W_out·v_MLP, v_resid)", "0.52", "ioi_alignment",
     dict(intervention="v_mlp_out_vs_das_resid", metric="cosine")),
    ("abs cos of random hidden directions with v_resid (mean)", "~0.036", "ioi_alignment",
     dict(intervention="random_vs_das_resid", metric="random_cosine_mean")),
    ("abs cos(W_out·v_MLP, gradient direction)", "—", "ioi_alignment",
     dict(intervention="v_mlp_out_vs_grad_resid", metric="cosine")),
    ("ABB/ABA separation along the row-space part", "small", "ioi_nullspace",
     dict(intervention="row_proj", metric="separation", split="test")),
    ("ABB/ABA separation along the nullspace part", "far larger", "ioi_nullspace",
     dict(intervention="null_proj", metric="separation", split="test")),
    ("dormant ratio, same-position patches (mean)", "small", "ioi_dormant",
     dict(intervention="das", metric="dormant_ratio", same_position="True")),
    ("dormant ratio, opposite-position patches (mean)", "large", "ioi_dormant",
     dict(intervention="das", metric="dormant_ratio", same_position="False")),
    ("illusion_check direction warnings for v_MLP (of 4)", "— (new)", "illusion_check",
     dict(intervention="verdict", metric="n_warnings")),
    ("illusion_check direction warnings for v_resid (of 1)", "— (new)", "illusion_check_resid",
     dict(intervention="verdict", metric="n_warnings")),
    ("ridge R² (MLP acts → resid_mid projection), mean over layers", "0.71 ± 0.17", "mlp_recovery",
     dict(metric="r2")),
    ("logistic accuracy, z = 1e-4 (mean over layers)", "0.69", "mlp_recovery",
     dict(intervention="logistic", metric="accuracy", z="0.0001")),
    ("logistic accuracy, z = 1e-3", "0.83", "mlp_recovery",
     dict(intervention="logistic", metric="accuracy", z="0.001")),
    ("logistic accuracy, z = 1e-2", "0.87", "mlp_recovery",
     dict(intervention="logistic", metric="accuracy", z="0.01")),
    ("logistic accuracy, z = 1e-1", "0.996", "mlp_recovery",
     dict(intervention="logistic", metric="accuracy", z="0.1")),
    ("neuron budget: R² of the linear fit FLDD ~ n", "linear", "ioi_neuron_budget",
     dict(intervention="fldd_vs_n_fit", metric="r2_fit")),
    ("neuron budget: FLDD with the first 128 neurons", "—", "ioi_neuron_budget",
     dict(intervention="das_n128", metric="fldd", split="test")),
    ("toy: DAS seeds landing on e1 (fraction)", "— (post: both solutions exist)", "toy_illusion",
     dict(intervention="das", metric="is_e1")),
    ("toy: DAS seeds landing on the illusory solution (fraction)", "—", "toy_illusion",
     dict(intervention="das", metric="is_illusory")),
    ("facts: fact flip, per-pair 1-D DAS (mean over the layer grid)",
     "GPT-2 XL: .81-.95 at layers 5-25, .48 at 35, ~0 at 0 and 40-45", "fact_patching",
     dict(intervention="pair_das", metric="fact_flip", split="test")),
    ("facts: fact flip, full MLP patch", "GPT-2 XL: ~0", "fact_patching",
     dict(intervention="full", metric="fact_flip", split="test")),
    ("facts: fact flip, row-space part of the per-pair directions", "GPT-2 XL: ~0",
     "fact_patching", dict(intervention="pair_row", metric="fact_flip", split="test")),
    ("facts: fact flip, one shared direction on held-out facts", "— (Wu et al.: stricter)",
     "fact_patching", dict(intervention="shared_das", metric="fact_flip", split="test")),
    ("facts: fact flip of the rank-1 edit", "GPT-2 XL: near the patch's", "fact_editing",
     dict(intervention="edit", metric="fact_flip")),
]
# fmt: on


def lookup(out: Path, experiment: str, filters: dict) -> str:
    """Mean of the matching metric rows, or 'n/a' when the step or the rows are missing."""
    path = out / experiment / C.METRICS
    if not path.exists():
        return "n/a"
    df = pd.read_csv(path)
    for k, v in filters.items():
        if k not in df:
            return "n/a"
        df = df[df[k].astype(str) == str(v)]
    return "n/a" if df.empty else f"{df.value.mean():.3f}"


def report(out: Path, model: str, times: dict[str, float], beside: dict[str, Path]) -> str:
    """The markdown report: the paper's numbers next to ours (and next to the other models'
    `beside`), and the steps' times."""
    first = compose([]).model.name  # the default model's column first, then by name
    dirs = dict(sorted(({model: out} | beside).items(), key=lambda md: (md[0] != first, md[0])))
    rows = [(q, p, *(lookup(d, e, f) for d in dirs.values()), e) for q, p, e, f in COMPARE]
    table = pd.DataFrame(rows, columns=["quantity", "paper (GPT-2 small)", *dirs, "experiment"])
    parts = [
        f"# Paper numbers vs {', '.join(dirs)}\n",
        "Wall time of each step run once, model loads included; test pairs unless noted. "
        "Each column: its directory, steps finished, the day the last one finished, total.\n",
        "".join(f"- {m}: {provenance(d)}\n" for m, d in dirs.items()),
        markdown_table(table.set_index("quantity")),
        "\n## Steps\n",
        markdown_table(
            step_table({m: times if m == model else finished(d) for m, d in dirs.items()})
        ),
        "\n## Per-experiment summaries\n",
    ]
    for e in times:
        summary = out / e / C.SUMMARY
        if summary.exists():
            parts.append(f"### {e}\n\n{summary.read_text()}\n")
    return "\n".join(parts)


def finished(out: Path) -> dict[str, float]:
    """{step: its recorded wall time} of the steps finished in `out`."""
    return {n: step_seconds(out / n, NAN) for n, _, _ in STEPS if (out / n / C.DONE).exists()}


def provenance(out: Path) -> str:
    """Where a column beside this report's comes from, when its steps finished, how long they took."""
    times = finished(out)
    stamps = [(out / n / C.DONE).stat().st_mtime for n in times]
    when = datetime.fromtimestamp(max(stamps)).date().isoformat() if stamps else "never"
    return f"{out}, {len(times)} of {len(STEPS)} steps, last finished {when}; {sum(times.values()) / 60:.1f} min"


def step_table(times: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Seconds per step (rows) and model (columns), with the total in minutes."""
    table = pd.DataFrame(times).reindex(
        [n for n, _, _ in STEPS if any(n in t for t in times.values())]
    )
    total = table.sum() / 60
    table = table.map(lambda s: "—" if pd.isna(s) else f"{s:.0f}")
    table.loc["total (min)"] = total.map(lambda m: f"{m:.1f}")
    return table.rename_axis("step (s)")


def step_seconds(run_dir: Path, elapsed: float) -> float:
    """A step's own wall time: as its DONE file recorded it (also for a reused step), else elapsed."""
    seconds = (read_done(run_dir) or {}).get("seconds")
    return float(seconds) if isinstance(seconds, int | float) else elapsed


def collect_figures(out: Path) -> None:
    """Copy every step's figures into `out/figures`."""
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    for png in out.glob("*/*.png"):
        if png.parent != figs:
            shutil.copy(png, figs / f"{png.parent.name}__{png.name}")


def option_of(override: str) -> str | None:
    """The option an `extra.*` override sets (`++extra.chunk_len=32` -> chunk_len), else None."""
    key = override_key(override)
    return key.removeprefix("extra.") if key.startswith("extra.") else None


def for_step(experiment: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to `experiment`: an `extra.*` one only where it is an option."""
    options = option_names(OPTIONS[experiment_runners()[experiment]])
    return [o for o in overrides if option_of(o) in (None, *options)]


def check_options_taken(experiments: list[str], overrides: list[str]) -> None:
    """Refuse an `extra.*` override that none of the steps' experiments has (a typo)."""
    taken = {o for e in experiments for o in for_step(e, overrides)}
    unused = [o for o in overrides if o not in taken]
    if unused:
        raise MlpimError(f"no step of this report takes {', '.join(unused)}")


def plan(out: Path, only: set[str], overrides: list[str]) -> list[tuple[str, object]]:
    """(step, composed config) of the steps to run; refuses, before any work, when a step's
    directory holds a run of another config. An `extra.*` override goes to the steps whose
    experiment has that option."""
    available = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    todo = [s for s in STEPS if (not only or s[0] in only) and s[1] in available]
    check_options_taken([experiment for _, experiment, _ in todo], overrides)
    steps, refused = [], []
    for name, experiment, extra in todo:
        own = [o.format(out=out) for o in extra]
        cfg = compose([f"experiment={experiment}", *own, *for_step(experiment, overrides)])
        try:
            check_run_dir(cfg, out / name)
        except RunDirError as e:
            if e.changed != "inputs":  # changed inputs: re-run at its turn (`supersede`)
                refused.append(f"{name} ({e.diff})")
        steps.append((name, cfg))
    if refused:
        raise MlpimError(
            f"{out} holds steps run with another config or other code: {'; '.join(refused)}; "
            f"write this report elsewhere with --out DIR, or delete those step directories"
        )
    return steps


def supersede(cfg, run_dir: Path, out: Path) -> Path | None:
    """Move `run_dir` to `out/superseded/<step>-<time>/` when it holds this config's finished
    run made from input files that have changed since (an upstream step re-ran), so that the
    step runs again; says so in one line. Returns where it went (None: nothing moved). A
    missing input is refused instead (`RunDirError`): nothing to re-run from."""
    try:
        check_run_dir(cfg, run_dir)
        return None
    except RunDirError as e:
        if e.changed != "inputs" or None in input_hashes(cfg).values():
            raise
        dest = out / "superseded" / f"{run_dir.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(dest)
        print(f"{run_dir.name}: {e.diff}; re-running it (old results moved to {dest})", flush=True)
        return dest


def run_step(name: str, cfg, out: Path) -> float:
    """Run one step into `out/name` (superseding stale results); its wall time in seconds."""
    start = time.time()
    print(f"\n=== {name}: {cfg.experiment}", flush=True)
    try:
        supersede(cfg, out / name, out)
        run(cfg, out / name)
    except RunDirError as e:  # changed while the report ran (e.g. code edited meanwhile)
        sys.exit(f"paper: error: {e}")
    return step_seconds(out / name, time.time() - start)


def beside_dirs(out: Path, default_out: bool, given: str) -> dict[str, Path]:
    """{model: its `make paper` directory} to put beside this report's: `--beside` (comma-separated
    directories), else, for the default `outputs/paper/<model>`, every other model's there."""
    if given:
        dirs = [Path(d) for d in given.split(",") if d]
    elif default_out:
        dirs = [d for d in sorted(out.parent.iterdir()) if d.is_dir() and d != out]
    else:
        dirs = []
    return {d.name: d for d in dirs if finished(d) and d.resolve() != out.resolve()}


def landmark_overrides(overrides: list[str]) -> list[str]:
    """For a model without landmarks, overrides that put both at its `model.signal_peak` (said
    in one line); none where it has them; refused, before any work, where it has neither."""
    model = compose(overrides).model
    if model.landmarks.mlp_in_the_middle is not None:
        return []
    if model.signal_peak is None:
        raise MlpimError(
            f"model {model.name!r} has no landmarks (experiment=ioi_locate suggests them); give the "
            "layer to study: ARGS='model.landmarks.mlp_in_the_middle=L model.landmarks.handover_layer=L'"
        )
    layer = int(model.signal_peak)
    print(
        f"{model.name} has no landmarks by the rule; this report studies layer {layer}, where the "
        f"END position signal peaks (model.signal_peak)",
        flush=True,
    )
    keys = ("mlp_in_the_middle", "handover_layer")
    return [f"model.landmarks.{k}={layer}" for k in keys]


def main(argv: list[str]) -> None:
    """Run the steps (`--only`) into `--out` and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated steps (default: all)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--beside", default="", help="other models' report directories, comma-separated"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write REPORT.md from finished steps"
    )
    args, overrides = parser.parse_known_args(argv)
    matplotlib.use("Agg")
    try:
        overrides += landmark_overrides([o for o in overrides if option_of(o) is None])
        model = compose([o for o in overrides if option_of(o) is None]).model.name
        out = Path(args.out or f"outputs/paper/{model}")
        steps = (
            []
            if args.report_only
            else plan(out, set(filter(None, args.only.split(","))), overrides)
        )
    except MlpimError as e:
        sys.exit(f"paper: error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = finished(out) if args.report_only else {}
    with reuse.session():  # models, prepared pairs and DAS runs shared by content hash
        for name, cfg in steps:
            times[name] = run_step(name, cfg, out)
        print(f"reused across steps: {reuse.hits() or 'nothing'}", flush=True)
    beside = beside_dirs(out, args.out is None, args.beside)
    (out / "REPORT.md").write_text(report(out, model, times, beside))
    collect_figures(out)
    print(f"\nreport: {out / 'REPORT.md'}; figures: {out / 'figures'}")


if __name__ == "__main__":
    main(sys.argv[1:])
