"""Write mlpim's own IOI pairs as a MIB-style IOI file (JSONL), for `dataset=mib`.

    python scripts/mib_ioi.py OUT.jsonl [--n 100] [--counterfactual s2_io_flip] [overrides ...]

Rows as in the MIB benchmark's IOI task (mib-bench/ioi): `prompt`, `choices` [IO, S],
`answerKey` 0, `metadata`, and the counterfactual prompt's row under
`<counterfactual>_counterfactual` (`mlpim.tasks.mib.ioi_mib_rows`). The pairs are S2 flips,
ABB->ABA and BAB->BAA (MIB's `s2_io_flip`), `--n` of each from the train names and templates
and `--n` of each from the test ones (`mlpim.tasks.ioi.make_pairs`), tokenized by the model's
tokenizer: mlpim's pair format scores base answer vs source answer, which these pairs allow
and the paper's ABB<->BAB pairs (the same two names as answers) do not.
Overrides are mlpim's (model=..., seed=..., dataset.*). Then, e.g.:

    mlpim check direction.npy direction_site=mlp_post direction_layer=20 dataset=mib \\
        dataset.path=OUT.jsonl dataset.counterfactual=s2_io_flip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlpim.config import compose
from mlpim.experiments.common import model_for
from mlpim.tasks.ioi import make_pairs
from mlpim.tasks.mib import ioi_mib_rows, write_mib_jsonl

COMBOS = [("ABB", "ABA"), ("BAB", "BAA")]  # S2 flips: the source's IO is the base's S


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the JSONL file to write (must be new)")
    p.add_argument("--n", type=int, default=100, help="pairs per combo and split")
    p.add_argument("--counterfactual", default="s2_io_flip", help="the counterfactual's type")
    return p.parse_known_args(argv)


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    if args.out.exists():
        sys.exit(f"mib_ioi: {args.out} exists; give a new file")
    cfg = compose(["device=cpu", *overrides])
    tok = model_for(cfg).tokenizer
    batches = [
        b
        for split in ("train", "test")
        for b in make_pairs(tok, cfg.dataset, split, COMBOS, args.n, cfg.seed)
    ]
    rows = ioi_mib_rows(batches, tok, args.counterfactual)
    write_mib_jsonl(rows, args.out)
    print(f"wrote {len(rows)} MIB-style IOI rows ({args.counterfactual}) to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
