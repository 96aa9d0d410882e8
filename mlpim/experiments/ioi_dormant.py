"""ioi_dormant: patching v_MLP wakes a dormant pathway (the post's MLP-output-on-v_true figure).

v_MLP is the DAS direction in the middle MLP's hidden activations (`mlp_post`), v_true the DAS
direction in the residual stream at the handover layer (`resid_post`). For prompts with disjoint
names (ABB/BAB vs CDD/DCD, both ways), the MLP's END output projected on v_true is compared with
and without the v_MLP patch: near zero unpatched and for same-position patches, large for
opposite-position ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from torch import Tensor

from mlpim import constants as C
from mlpim.analysis.dormant import (
    combo_name,
    combo_projections,
    dormant_combos,
    layer_note,
    projection_stats,
    same_position,
)
from mlpim.engine.direction import Direction
from mlpim.engine.interventions import clean_metrics, evaluate, prepare
from mlpim.engine.patching import subspace
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.experiments.common import das_basis, model_for, require_ioi, site_of
from mlpim.options import IoiDormantOptions as Options
from mlpim.options import options
from mlpim.report import io
from mlpim.report.dormant import plot_dormant, summarize, summary_markdown
from mlpim.tasks.ioi import make_pairs

log = logging.getLogger(__name__)
PROJECTIONS = "projections.csv"


def combo_rows(
    cfg: DictConfig,
    opts: Options,
    model,
    combo: tuple[str, str],
    index: int,
    layer: int,
    v_mlp: Tensor,
    v_true: Tensor,
) -> tuple[list[dict], pd.DataFrame]:
    """Metric rows and raw projections of one (base, source) combo."""
    split, n = opts.split, opts.n_per_combo
    batches = make_pairs(model.tokenizer, cfg.dataset, split, [combo], n, cfg.seed + index)
    batches = [b.to(model.cfg.device) for b in batches]
    prepared = prepare(model, batches, "mlp_post", layer, cfg.method.engine)
    patched, clean = combo_projections(model, prepared, layer, v_mlp, v_true)
    stats = projection_stats(patched, clean)
    name, same = combo_name(*combo), same_position(*combo)
    keys = {"site": "mlp_post", "layer": layer, "split": split, "combo": name}
    keys |= {"same_position": same, "n": len(clean)}
    rows = io.metric_rows(clean_metrics(prepared) | stats["clean"], intervention="clean", **keys)
    patch = evaluate(model, prepared, subspace(v_mlp))
    rows += io.metric_rows(patch | stats["das"], intervention="das", **keys)
    raw = {"combo": name, "same_position": same, "patched": patched.numpy()}
    return rows, pd.DataFrame(raw | {"unpatched": clean.numpy()})


def resid_layer_of(cfg: DictConfig, opts: Options, mlp_layer: int) -> int:
    """`extra.resid_layer` (where v_true lives), logged with whether the MLP feeds it."""
    if opts.resid_layer is None:
        raise ConfigError(
            f"model {cfg.model.name!r} has no handover_layer landmark: set extra.resid_layer=..."
        )
    resid_layer = int(opts.resid_layer)
    note = layer_note(mlp_layer, resid_layer)
    (log.warning if mlp_layer > resid_layer else log.info)(note)
    return resid_layer


def run(cfg: DictConfig, run_dir: Path, directions: Mapping[str, Direction]) -> pd.DataFrame:
    """The MLP output on v_true, patched and unpatched, per combo; the tidy metrics."""
    opts = options(cfg, Options)
    require_ioi(cfg)
    model = model_for(cfg)
    kind, mlp_layer = site_of(cfg, model)
    if kind != "mlp_post":
        raise ConfigError(f"ioi_dormant patches v_MLP at mlp_post, not {kind}")
    resid_layer = resid_layer_of(cfg, opts, mlp_layer)
    v_mlp = das_basis(cfg, model, "mlp_post", mlp_layer, directions.get("direction"), run_dir)
    resid = directions.get("extra.resid_direction")
    v_true = das_basis(cfg, model, "resid_post", resid_layer, resid, run_dir)
    rows, raws = [], []
    for i, combo in enumerate(dormant_combos()):
        r, raw = combo_rows(cfg, opts, model, combo, i, mlp_layer, v_mlp, v_true)
        rows, raws = rows + r, [*raws, raw]
    after = mlp_layer > resid_layer
    df = io.tidy(rows, cfg).assign(v_true_layer=resid_layer, mlp_after_handover=after)
    raw = pd.concat(raws, ignore_index=True)
    io.write_csv(raw, run_dir, PROJECTIONS)
    title = f"{cfg.model.name}: MLP{mlp_layer} output on v_true (resid_post L{resid_layer})"
    plot_dormant(raw, run_dir, title)
    io.write_text(summary_markdown(cfg, df, mlp_layer, resid_layer), run_dir, C.SUMMARY)
    return df


EXPERIMENT = Experiment(
    run=run, options=Options, summarize=summarize, inputs={"extra.resid_direction": None}
)
