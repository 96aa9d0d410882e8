"""toy_illusion: the post's 3-neuron toy model of the illusion; no language model is loaded.

1. the post's two patching tables (e1 and v = (e2+e3)/√2), plus the full hidden patch;
2. the appendix's rotated basis, each direction classified as correlated / causal by measurement;
3. DAS (d=3, k=1) from `extra.n_seeds` seeds: how often it lands on e1 vs an illusory direction;
4. the k-dim construction (k irrelevant + k dormant + 1 real neuron) for k in `extra.ks`.
Writes toy_tables.md (the tables, printed too), das_seeds.csv and toy_illusion.png.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from mlpim.analysis import toy
from mlpim.engine.direction import Direction
from mlpim.experiments import Experiment
from mlpim.options import ToyIllusionOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.report.toy import classification_section, patch_sections, plot

MODEL_NAME = "toy_linear"


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """The toy's tables, bases, DAS restarts and k-dim construction; the tidy metrics."""
    opts = options(cfg, Options)
    model = toy.post_model()
    standard = toy.classification_frame(model, toy.standard_directions())
    rotated = toy.classification_frame(model, toy.rotated_basis())
    seeds = toy.das_seeds(
        model,
        n_seeds=opts.n_seeds,
        seed0=int(cfg.seed) * 1000,
        steps=opts.das_steps,
        lr=opts.das_lr,
        tol=opts.iia_tol,
    )
    io.write_csv(seeds, run_dir, "das_seeds.csv")
    hd = [toy.higher_dim_measures(toy.higher_dim(k, opts.extra_dims)) for k in opts.ks]
    hd = pd.concat(hd, ignore_index=True)
    sections = [
        *patch_sections(model),
        classification_section(standard, rotated),
        "## DAS on the toy model\n\n" + toy.das_table(toy.das_summary(seeds)),
        "## Higher dimensions\n\n" + toy.higher_dim_table(hd),
    ]
    text = "\n\n".join(sections) + "\n"
    print(text)
    io.write_text(text, run_dir, "toy_tables.md")
    rows = toy.table_rows(model)
    rows += toy.classification_rows(standard, "standard_basis")
    rows += toy.classification_rows(rotated, "rotated_basis")
    rows += toy.das_rows(seeds) + toy.higher_dim_rows(hd)
    df = io.tidy(rows, cfg)
    df["model"] = MODEL_NAME
    plot(model, seeds, hd, run_dir)
    return df


EXPERIMENT = Experiment(run=run, options=Options, positive=("das_lr", "das_steps"))
