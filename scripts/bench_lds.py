"""Time one random direction's FLDD two ways, side by side, on each engine that applies: from the
patched END logits over the whole vocabulary (`evaluate`, the path before), and from two
unembedding columns (`patched_fldd`, what the references and the checks use now).

Usage (flags first, then Hydra overrides for `mlpim.config.compose`):

    .venv/bin/python scripts/bench_lds.py [--directions N] [--threads N] [--out path.csv]
        model=smollm2-135m [site.layer=...]

The site is `mlp_post` at the model's MLP-in-the-middle landmark (or `site.layer`, or its
`signal_peak`), on the test pairs (`task_splits(...)["test"]`). The kernel is timed where `auto`
takes it (patch at END, a kernel family), the cache engine always. Each row: the median seconds per direction over
`--directions` seeded random directions, the two paths interleaved, and the largest FLDD
difference between them (they must agree within 1e-4, or the script stops).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from mlpim.config import compose
from mlpim.engine.interventions import choose_engine, evaluate, patched_fldd, prepare
from mlpim.engine.patching import subspace
from mlpim.experiments.common import model_for
from mlpim.tasks import task_splits

DEFAULT_OUT = Path("outputs/bench/bench_lds.csv")
PATHS = {
    "whole vocabulary (before)": lambda model, prep, s: evaluate(model, prep, s)["fldd"],
    "two columns": patched_fldd,
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--directions", type=int, default=6, help="random directions timed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV of the table")
    for flag in ("--epochs", "--plain-batches", "--warmup", "--min-seconds"):  # `make bench`
        p.add_argument(flag, help=argparse.SUPPRESS)  # passes bench_das.py's ARGS here too
    p.add_argument("--skip-pyvene", action="store_true", help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def site_layer(cfg) -> int:
    """site.layer, else the MLP landmark, else the signal peak."""
    for layer in (cfg.site.layer, cfg.model.landmarks.mlp_in_the_middle, cfg.model.signal_peak):
        if layer is not None:
            return int(layer)
    sys.exit("bench_lds: error: the model has no landmark; set site.layer=N")


def time_engine(model, test, layer: int, engine: str, n: int) -> list[dict]:
    """Per path, the median seconds per direction and its FLDDs, interleaved per direction."""
    prep = prepare(model, test, "mlp_post", layer, engine)
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(n, prep[0].base_act.shape[-1], generator=gen).to(prep[0].base_act)
    times, values = {p: [] for p in PATHS}, {p: [] for p in PATHS}
    for fldd in PATHS.values():  # warm-up: the one-time `linear_unembed` check, caches
        fldd(model, prep, subspace((dirs[0] / dirs[0].norm())[:, None]))
    for u in dirs:
        setter = subspace((u / u.norm())[:, None])
        for path, fldd in PATHS.items():
            start = time.perf_counter()
            values[path].append(fldd(model, prep, setter))
            times[path].append(time.perf_counter() - start)
    gap = max(abs(a - b) for a, b in zip(*values.values(), strict=True))
    if not gap <= 1e-4:
        sys.exit(f"bench_lds: error: the two paths' FLDDs differ by {gap:.3g} on {engine}")
    return [
        {"engine": engine, "path": p, "s_per_direction": statistics.median(t), "max_fldd_diff": gap}
        for p, t in times.items()
    ]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(["device=cpu", *overrides])
    layer, model = site_layer(cfg), model_for(cfg)
    test = [b.to(model.cfg.device) for b in task_splits(model.tokenizer, cfg.dataset, 0)["test"]]
    auto = choose_engine(model, "auto", test, "mlp_post")
    engines = ["kernel", "cache"] if auto == "kernel" else ["cache"]
    rows = [r for e in engines for r in time_engine(model, test, layer, e, args.directions)]
    table = pd.DataFrame(rows)
    table["vs_before"] = table.s_per_direction / table.groupby("engine").s_per_direction.transform(
        "first"
    )
    print(
        f"{cfg.model.name}, mlp_post L{layer}, {sum(map(len, test))} test pairs, "
        f"threads {torch.get_num_threads()}"
    )
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
