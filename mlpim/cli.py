"""Command line: `mlpim run [-m] [overrides]`, `mlpim list`, `mlpim collect DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

from mlpim.config import CONF_DIR, register_configs

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

    from mlpim.engine.models import ConfigError, ModelNotFoundError
    from mlpim.run import RunDirError, run

    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        try:
            run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except (ConfigError, ModelNotFoundError, RunDirError, ValueError) as e:
            print(f"mlpim: error: {e}", file=sys.stderr)
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                sys.exit(2)  # in a sweep, the other jobs still run; this one has no DONE

    sys.argv = ["mlpim", *argv]
    main()


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
