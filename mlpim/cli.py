"""Command line: `mlpim run [-m] [overrides]`, `mlpim check DIRECTION [overrides]`, `mlpim list`,
`mlpim collect DIR`."""

from __future__ import annotations

import os
import re
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mlpim import lock
from mlpim.config import CONF_DIR, register_configs
from mlpim.errors import MlpimError

USAGE = """usage: mlpim run [-m] [hydra overrides ...]   run an experiment (sweep with -m)
       mlpim check [-m] DIRECTION [overrides ...] is this direction an illusion? (--help: formats)
       mlpim list                                list experiments, models, sites, methods
       mlpim collect DIR [--out OUT]             gather a sweep's metrics into one table + plots
Examples:
  mlpim run experiment=ioi_mlp8_das
  mlpim run experiment=ioi_baseline model=gpt2-small model.path=/models/gpt2
  mlpim run -m experiment=ioi_mlp8_das site.layer=range(14,22,2) method.dim=1,2,4 seed=0,1
  mlpim run --cfg job experiment=ioi_locate        # print the composed config"""


CHECK_USAGE = """usage: mlpim check [-m] DIRECTION [hydra overrides ...]
Runs illusion_check on a direction saved by mlpim or another tool, prints the verdict table and
where the report is: the same as `mlpim run experiment=illusion_check direction=DIRECTION ...`
(same run directory, locking, errors and exit codes). The task and model are given as usual
(dataset=..., model=...). The format is told from the file's contents (docs/bring-your-own.md).
Examples, one per format:
  mlpim check outputs/ioi_mlp8_das/RUN/subspace.pt                 # mlpim's own direction
  mlpim check v.npy direction_site=mlp_post direction_layer=20       # a .npy (or .pt) vector
  mlpim check my_pyvene_dir                                         # pyvene IntervenableModel.save
  mlpim check my_pyvene_dir direction_key=0                         # ... one of several interventions
  mlpim check my_sae_dir direction_feature=123                      # SAELens folder: a W_dec row
  mlpim check rotation.safetensors direction_site=resid_post direction_layer=20 direction_columns=0
                                                                    # causalab: one column of k
  mlpim check dirs.safetensors direction_key=v direction_site=mlp_post direction_layer=20
  mlpim check dirs.npz direction_key=v direction_site=mlp_post direction_layer=20
  mlpim check my_sae_dir direction_feature=123 dataset=mib dataset.path=ioi_mib.jsonl \\
      dataset.counterfactual=s2_io_flip                             # a MIB-style task
  mlpim check v.npy direction_site=mlp_post direction_layer=20 dataset=pairs \\
      dataset.path=task.jsonl dataset.invalid=drop dataset.keep=known   # your own pairs
A k-dim subspace (k <= 16) is checked whole, one verdict; choose columns with direction_columns=[...]
or check every column in a sweep: mlpim check -m DIR direction_columns=range(k)"""
SAFE_VALUE = re.compile(r"[\w./~+@-]+")  # a path Hydra's override grammar takes unquoted


def check_command(argv: list[str]) -> None:
    """`mlpim check [-m] DIRECTION [overrides]`: `mlpim run experiment=illusion_check
    direction=DIRECTION [overrides]`, nothing more. DIRECTION is the first argument; one with `=`
    (a sweep's job folder: method.dim=1,seed=0/v.npy) is the direction when it exists."""
    if argv and argv[0] in ("-h", "--help"):
        print(CHECK_USAGE)
        return
    sweep = [a for a in argv if a in ("-m", "--multirun")]
    args = [a for a in argv if a not in sweep]
    first = args[0] if args else ""
    if not first.strip() or first.startswith("-") or ("=" in first and not Path(first).exists()):
        _usage_error("mlpim check needs the direction first: mlpim check DIRECTION [overrides]")
    direction, overrides = args[0], args[1:]
    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("experiment", "direction")]
    more = [o for o in overrides if "=" not in o and Path(o).exists()]
    if more:
        _usage_error(
            f"mlpim check checks one direction: {direction}; {', '.join(more)} is not an override"
            " (KEY=VALUE): check each in its own command"
        )
    if own:
        _usage_error(f"mlpim check sets experiment and direction itself; drop {', '.join(own)}")
    value = direction if SAFE_VALUE.fullmatch(direction) else _quoted(direction)
    _hydra_main([*sweep, "experiment=illusion_check", f"direction={value}", *overrides])


def _quoted(value: str) -> str:
    """A value in Hydra's single quotes (backslashes and quotes escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _usage_error(message: str) -> None:
    print(f"mlpim: error: {message}", file=sys.stderr)
    sys.exit(2)


def _hydra_main(argv: list[str]) -> None:
    from mlpim import sweep  # slow imports (torch, pandas): not for `mlpim --help` or `list`
    from mlpim.run import run

    register_configs()
    started = []  # set once a job runs: an error before it is Hydra's composition's

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        """One job: run it (a sweep's job records its outcome; a single run's error exits 2)."""
        _use_agg()  # also in the worker processes of a sweep launcher
        started.append(True)
        hc = HydraConfig.get()
        run_dir, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
        if hc.mode == RunMode.MULTIRUN:
            sweep.run_job(cfg, run_dir, overrides)  # records the outcome; the sweep goes on
            return
        try:
            run(cfg, run_dir, overrides)
        except MlpimError as e:
            print(f"mlpim: error: {e}", file=sys.stderr)
            sys.exit(2)

    sys.argv = ["mlpim", *argv]
    sweep.LAST.update(failed=0)
    try:
        with hydra_errors_raised():
            main()
    except KeyboardInterrupt:
        print(f"mlpim: {interrupted()}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if started or composition_error(e) is None:
            traceback.print_exc()  # a bug: its traceback, exit 1 (as Hydra reports it)
            sys.exit(1)
        _usage_error(composition_error(e))
    finally:
        lock.release_all()
    if sweep.LAST["failed"]:
        sys.exit(1)


@contextmanager
def hydra_errors_raised():
    """Hydra raises its errors here (HYDRA_FULL_ERROR) instead of printing them and exiting 1."""
    old = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = old


def composition_error(e: BaseException) -> str | None:
    """One line for an error of Hydra's config composition (an unknown config, a value of the
    wrong type, a YAML syntax error with its file and position); None for any other error."""
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    marked = next((c for c in chain if isinstance(c, yaml.MarkedYAMLError)), None)
    if marked is not None and marked.problem_mark is not None:
        mark = marked.problem_mark
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}"
        context = f" ({marked.context})" if marked.context else ""
        return f"YAML syntax error in {where}: {marked.problem}{context}"
    if not isinstance(e, HydraException | OmegaConfBaseException):
        return None
    if isinstance(e, MissingConfigException):
        group = (e.missing_cfg_file or "").rpartition("/")[0]
        options = f"; Available options in '{group}': {', '.join(e.options)}" if e.options else ""
        return f"{str(e).splitlines()[0]}{options}"
    lines = [str(c).strip().splitlines()[0] for c in (e, e.__cause__) if str(c or "").strip()]
    return ": ".join(dict.fromkeys(lines))


def interrupted() -> str:
    """The line printed on Ctrl-C: what the interrupted run left (never a half-written file)."""
    from mlpim.run import ACTIVE, interrupted_message  # slow import: see _hydra_main

    if ACTIVE["dir"] is None:
        return "interrupted before any run started; nothing was written"
    return interrupted_message(ACTIVE["dir"], ACTIVE["before"])


def _use_agg() -> None:
    """The CLI writes figures to files: matplotlib's non-interactive backend."""
    import matplotlib  # slow import: not for `mlpim --help`

    matplotlib.use("Agg")


def list_options() -> str:
    """Available options of each config group."""
    lines = []
    for group in ("experiment", "model", "site", "method", "dataset"):
        names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"{group + ':':12s}{', '.join(names)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the command line `argv` (default: sys.argv[1:]); exits 2 on a bad command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    _use_agg()
    if cmd == "run":
        _hydra_main(rest)
    elif cmd == "check":
        check_command(rest)
    elif cmd == "list" and rest:
        print(
            f"mlpim: error: mlpim list takes no arguments (got {' '.join(rest)})", file=sys.stderr
        )
        sys.exit(2)
    elif cmd == "list":
        print(list_options())
    elif cmd == "collect":
        from mlpim.report.collect import collect_cli  # slow import: see _hydra_main

        collect_cli(rest)
    else:
        print(f"mlpim: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
