"""Command line: `mlpim run [-m] [overrides]`, `mlpim list`, `mlpim collect DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

from mlpim import lock
from mlpim.config import CONF_DIR, register_configs
from mlpim.errors import MlpimError

USAGE = """usage: mlpim run [-m] [hydra overrides ...]   run an experiment (sweep with -m)
       mlpim list                                list experiments, models, sites, methods
       mlpim collect MULTIRUN_DIR                gather a sweep's metrics into one table + plots
Examples:
  mlpim run experiment=ioi_mlp8_das
  mlpim run experiment=ioi_baseline model=gpt2-small model.path=/models/gpt2
  mlpim run -m experiment=ioi_mlp8_das site.layer=range(14,22,2) method.dim=1,2,4 seed=0,1
  mlpim run --cfg job experiment=ioi_locate        # print the composed config"""


def _hydra_main(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from mlpim import sweep
    from mlpim.run import run

    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        _use_agg()  # also in the worker processes of a sweep launcher
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
        main()
    except KeyboardInterrupt:
        print(f"mlpim: {interrupted()}", file=sys.stderr)
        sys.exit(130)
    finally:
        lock.release_all()
    if sweep.LAST["failed"]:
        sys.exit(1)


def interrupted() -> str:
    """The line printed on Ctrl-C: what the interrupted run left (never a half-written file)."""
    from mlpim.run import ACTIVE, interrupted_message

    if ACTIVE["dir"] is None:
        return "interrupted before any run started; nothing was written"
    return interrupted_message(ACTIVE["dir"], ACTIVE["before"])


def _use_agg() -> None:
    """The CLI writes figures to files: matplotlib's non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")


def list_options() -> str:
    """Available options of each config group."""
    lines = []
    for group in ("experiment", "model", "site", "method", "dataset"):
        names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"{group + ':':12s}{', '.join(names)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    _use_agg()
    if cmd == "run":
        _hydra_main(rest)
    elif cmd == "list":
        print(list_options())
    elif cmd == "collect":
        from mlpim.report.collect import collect_cli

        collect_cli(rest)
    else:
        print(f"mlpim: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
