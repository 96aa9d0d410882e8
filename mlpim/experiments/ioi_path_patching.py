"""ioi_path_patching: through which downstream heads do v_resid, v_MLP and the full MLP patch act?

Interventions (at END, source BAB into base ABB and back, the test pairs): v_resid (DAS direction
at resid_post of the handover layer), v_MLP (DAS direction at mlp_post of the MLP in the middle),
mlp_full (the whole MLP patched), and `source_run` (the whole source prompt: the clean ABB vs BAB
difference the circuit itself produces). For each and each head after the site: ΔLD when only
that head's END output comes from the patched run (`ld_via_head_output`), ΔLD when only its END
query does (`ld_via_query`), and its DLA in the patched run (`dla`; intervention `clean`: the
unpatched run). See `mlpim.analysis.paths` for the definitions and the measurement,
`mlpim.report.path_patching` for the figure and summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from torch import Tensor

from mlpim.analysis import paths
from mlpim.engine.direction import Direction
from mlpim.engine.family import family_of
from mlpim.engine.models import ConfigError, validate_site
from mlpim.engine.patching import full, subspace
from mlpim.experiments import Experiment
from mlpim.experiments.common import model_for, require_ioi, saved_or_trained
from mlpim.options import IoiPathPatchingOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.report.path_patching import heatmaps, summarize, summary_markdown
from mlpim.tasks.ioi import paper_pairs


def direction(
    cfg: DictConfig, model, kind: str, layer: int, given: Direction | None, run_dir: Path, tag: str
) -> Tensor:
    """A 1-D (or k-D) DAS basis at (kind, layer): the `given` one, else trained and saved."""
    validate_site(model, kind, layer)
    history, save_as = run_dir / f"history_{tag}.csv", run_dir / f"subspace_{tag}.pt"
    return saved_or_trained(cfg, model, kind, layer, given, history=history, save_as=save_as)


def interventions(
    cfg: DictConfig, opts: Options, model, run_dir: Path, directions: Mapping[str, Direction]
) -> list[paths.Intervention]:
    """v_resid, v_MLP and the full MLP patch at the model's landmark layers."""
    marks = cfg.model.landmarks
    res, mlp = ("resid_post", int(marks.handover_layer)), ("mlp_post", int(marks.mlp_in_the_middle))
    v_resid = direction(cfg, model, *res, directions.get("extra.resid_direction"), run_dir, "resid")
    v_mlp = direction(cfg, model, *mlp, directions.get("direction"), run_dir, "mlp")
    return [
        paths.Intervention("v_resid", *res, subspace(v_resid)),
        paths.Intervention("v_mlp", *mlp, subspace(v_mlp)),
        paths.Intervention("mlp_full", *mlp, full),
    ]


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """Path-patch every intervention over the test pairs; the tidy metrics."""
    opts = options(cfg, Options)
    require_ioi(cfg)
    model = model_for(cfg)
    if why := family_of(model).kernel_refusal:
        raise ConfigError(f"ioi_path_patching traces END with the kernel, which cannot: {why}")
    todo = interventions(cfg, opts, model, run_dir, directions)
    pairs = paper_pairs(model.tokenizer, cfg.dataset, "test", cfg.seed)
    batches = [b.to(model.cfg.device) for b in pairs]
    df = paths.path_patch(model, batches, todo, opts.frozen_norm).assign(split="test")
    df = io.tidy(df.to_dict("records"), cfg)
    first = min(iv.layer for iv in todo) + 1
    heatmaps(df, run_dir, f"{cfg.experiment}: {cfg.model.name}, ABB<->BAB", first)
    io.write_text(summary_markdown(cfg, df), run_dir, "summary.md")
    return df


EXPERIMENT = Experiment(
    run=run, options=Options, summarize=summarize, inputs={"extra.resid_direction": None}
)
