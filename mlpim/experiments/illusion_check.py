"""illusion_check: which warning signs of the MLP-in-the-middle illusion does a saved direction show?

The direction (`direction=path/to/subspace.pt`, required) must be 1-D: a k-D subspace is refused
(save one column to check it). Its site and layer are read from the file (`site=` is ignored).
The checks (`mlpim.analysis.illusion`) are measured on the paper's IOI test pairs:

1. component vs subspace: FLDD of patching the whole site (`full`) vs along v (`das`);
2. nullspace bridging (mlp_post): v's W_out row-space and nullspace parts patched alone
   (`row_proj`, `null_proj`, unit vectors as in ioi_nullspace);
3. dormant row part (mlp_post): how far the patch moves the activation along v's row-space
   direction, against how far base and source activations differ along it;
4. alignment (mlp_post, with `extra.resid_direction`): |cos(W_out·v, v_ref)|, information only;
5. random-MLP baseline (mlp_post, `extra.random_mlp_seeds` > 0): DAS on a norm-matched random
   MLP at the same layer (`random_mlp`, as ioi_random_mlp).
Writes metrics.csv, verdict.md (also as summary.md), illusion_check.png; prints the verdict table.
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from jaxtyping import Float
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mlpim import constants as C
from mlpim.analysis import illusion
from mlpim.analysis import nullspace as ns
from mlpim.engine.interventions import Prepared
from mlpim.engine.models import ConfigError, validate_site
from mlpim.engine.subspace import load_subspace
from mlpim.experiments.common import model_for, paper_splits, site_width
from mlpim.experiments.ioi_nullspace import intervention_bases, patching_rows
from mlpim.experiments.ioi_random_mlp import augmented_splits, random_mlp_rows
from mlpim.experiments.subspace import loaded_basis
from mlpim.report import io

log = logging.getLogger(__name__)
PLOT = "illusion_check.png"
RESID_KINDS = ("resid_pre", "resid_post")
CHECK_METRICS = ("check_value", "threshold", "warning")


def saved_direction(
    path: str, model, model_name: str, kinds: tuple[str, ...] | None = None,
    site: tuple[str | None, int | None] = (None, None),
) -> tuple[str, int, Float[Tensor, " d"]]:  # fmt: skip
    """(site, layer, unit v) of a saved 1-D subspace, checked against the model's widths."""
    saved = load_subspace(path, *site)
    kind, layer = saved.get("site"), saved.get("layer")
    if kind is None or layer is None:
        raise ConfigError(
            f"{path} does not record the site and layer it was found at; "
            "give them as direction_site=... direction_layer=..."
        )
    if kinds is not None and kind not in kinds:
        raise ConfigError(f"{path} holds a {kind} subspace; expected one of {', '.join(kinds)}")
    if saved.get("model", model_name) != model_name:
        log.warning("%s was found on %s, checked on %s", path, saved["model"], model_name)
    validate_site(model, kind, int(layer))
    basis = loaded_basis(path, kind, int(layer), site_width(model, kind), model)
    if basis.shape[1] != 1:
        raise ConfigError(
            f"{path} holds a {basis.shape[1]}-D subspace; illusion_check checks one direction "
            "(save a single column with mlpim.engine.subspace.save_subspace)"
        )
    v = basis[:, 0].to(model.cfg.device)
    return kind, int(layer), v / v.norm()


def fldd_on_test(rows: list[dict]) -> dict[str, float]:
    """Test-pair FLDD per intervention (mean over seeds where there are several)."""
    df = pd.DataFrame(rows)
    test = df[(df.split == "test") & (df.metric == "fldd")]
    return test.groupby("intervention").value.mean().to_dict()


def end_acts(prepared: list[Prepared]) -> tuple[Tensor, Tensor]:
    """Base and source site activations at END over all pairs."""
    return torch.cat([p.base_act for p in prepared]), torch.cat([p.source_act for p in prepared])


def reference_direction(cfg: DictConfig, model) -> Tensor | None:
    """The saved 1-D residual direction `extra.resid_direction` (None when not given)."""
    path = cfg.extra.get("resid_direction")
    return saved_direction(path, model, cfg.model.name, RESID_KINDS)[2] if path else None


def alignment(cfg: DictConfig, v: Tensor, w_out: Tensor, v_ref: Tensor | None) -> illusion.Check:
    """Check 4 against the reference residual direction, if there is one."""
    if v_ref is None:
        return illusion.not_applicable("alignment", "no extra.resid_direction given")
    return illusion.alignment_check(v, w_out, v_ref, int(cfg.extra.get("n_random", 1000)), cfg.seed)


def random_baseline(
    cfg: DictConfig, model, splits: dict[str, list[Prepared]], layer: int, fldd_v: float,
    run_dir: Path,
) -> tuple[list[dict], illusion.Check]:  # fmt: skip
    """Check 5: `extra.random_mlp_seeds` random MLPs, each with a 1-D DAS run (ioi_random_mlp)."""
    n_seeds = int(cfg.extra.get("random_mlp_seeds", 1))
    if n_seeds <= 0:
        return [], illusion.not_applicable("random_mlp", "extra.random_mlp_seeds=0")
    epochs = cfg.extra.get("random_mlp_epochs") or cfg.method.epochs
    sub = OmegaConf.merge(cfg, {"method": {"dim": 1, "epochs": epochs}})
    aug = augmented_splits(model, splits, layer)
    rows = []
    for seed in range(cfg.seed, cfg.seed + n_seeds):
        rows += random_mlp_rows(sub, model, aug, layer, seed, run_dir)
    return rows, illusion.random_mlp_check(fldd_on_test(rows)["random_mlp"], fldd_v)


def mlp_post_checks(
    cfg: DictConfig, model, splits: dict[str, list[Prepared]], layer: int, v: Tensor,
    v_ref: Tensor | None, keys: dict, run_dir: Path,
) -> tuple[list[dict], list[illusion.Check]]:  # fmt: skip
    """All five checks at an MLP hidden site, with the patching rows behind them."""
    w_out = ns.mlp_w_out(model, layer)
    proj, null = ns.split(v, w_out)
    rows = patching_rows(model, splits, intervention_bases(v, proj, null), "mlp_post", layer, keys)
    for name, part in (("row_proj", proj), ("null_proj", null)):
        rows += io.metric_rows({"norm_sq": part.norm().item() ** 2}, intervention=name,
                               split="test", **keys)  # fmt: skip
    fldd = fldd_on_test(rows)
    checks = illusion.mlp_checks(fldd, v, w_out, *end_acts(splits["test"]))
    checks.append(alignment(cfg, v, w_out, v_ref))
    random_rows, random_check = random_baseline(cfg, model, splits, layer, fldd["das"], run_dir)
    return rows + random_rows, [*checks, random_check]


def other_site_checks(
    model, splits: dict[str, list[Prepared]], kind: str, layer: int, v: Tensor, keys: dict
) -> tuple[list[dict], list[illusion.Check]]:
    """Check 1 at a residual (or other non-MLP-hidden) site; the MLP checks are n.a."""
    rows = patching_rows(model, splits, {"das": ns.unit_basis(v)}, kind, layer, keys)
    fldd = fldd_on_test(rows)
    why = f"needs an MLP hidden site (mlp_post), not {kind}"
    checks = [illusion.component_check(fldd["das"], fldd["full"])]
    return rows, checks + [illusion.not_applicable(n, why) for n in illusion.CHECKS[1:]]


def check_rows(checks: list[illusion.Check], keys: dict) -> list[dict]:
    """Each check as tidy rows (check_value, threshold, warning 1/0/NaN) and n_warnings."""
    rows = []
    for c in checks:
        warn = math.nan if c.warning is None else float(c.warning)
        values = dict(zip(CHECK_METRICS, (c.value, c.threshold, warn), strict=True))
        rows += io.metric_rows(values, intervention=c.name, split="test", **keys)
    n, _ = illusion.verdict(checks)
    return rows + io.metric_rows({"n_warnings": float(n)}, intervention="verdict", split="test",
                                 **keys)  # fmt: skip


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    if not cfg.direction:
        raise ConfigError(
            "illusion_check needs a saved 1-D subspace: direction=path/to/subspace.pt"
        )
    model = model_for(cfg)
    kind, layer, v = saved_direction(
        cfg.direction, model, cfg.model.name, site=(cfg.direction_site, cfg.direction_layer)
    )
    v_ref = reference_direction(cfg, model)
    if (kind, layer) != (cfg.site.kind, cfg.site.layer):
        log.info("checking %s L%d (from %s), not the configured site", kind, layer, cfg.direction)
    splits = paper_splits(cfg, model, kind, layer)
    keys = {"site": kind, "layer": layer, "dim": 1, "seed": cfg.seed}
    if kind == "mlp_post":
        rows, checks = mlp_post_checks(cfg, model, splits, layer, v, v_ref, keys, run_dir)
    else:
        rows, checks = other_site_checks(model, splits, kind, layer, v, keys)
    df = io.tidy(rows + check_rows(checks, keys), cfg)
    text = verdict_markdown(cfg, kind, layer, checks)
    for name in (C.VERDICT, C.SUMMARY):
        io.write_text(text, run_dir, name)
    name = "/".join(Path(cfg.direction).parts[-2:])
    verdict_plot(checks, run_dir, f"{cfg.experiment}: {name} ({cfg.model.name}, {kind} L{layer})")
    return df


def checks_from(df: pd.DataFrame) -> list[illusion.Check]:
    """The checks back from a metrics table (rule and detail are not stored)."""
    wide = df[df.metric.isin(CHECK_METRICS)].pivot_table(
        index="intervention", columns="metric", values="value", dropna=False
    )
    return [
        illusion.Check(name, wide.loc[name, "check_value"], wide.loc[name, "threshold"],
                       None if math.isnan(w := wide.loc[name, "warning"]) else bool(w), "")
        for name in illusion.CHECKS if name in wide.index
    ]  # fmt: skip


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """The verdict table: one row per check and the verdict."""
    return illusion.verdict_table(checks_from(df))


def verdict_markdown(cfg: DictConfig, kind: str, layer: int, checks: list[illusion.Check]) -> str:
    n, label = illusion.verdict(checks)
    details = "\n".join(
        f"- **{c.name}**: {c.detail}" + ("" if c.rule == illusion.NA else f"; warns when {c.rule}")
        for c in checks
    )
    return (
        f"# {cfg.experiment}: {label}\n\nmodel: {cfg.model.name}; direction: {cfg.direction} "
        f"({kind}, layer {layer}); seed {cfg.seed}; FLDDs on the test pairs\n\n"
        f"{n} warning sign(s): {label}.\n\n{io.markdown_table(illusion.verdict_table(checks))}"
        f"\n\n{details}\n"
    )


def verdict_plot(checks: list[illusion.Check], run_dir: Path, title: str) -> None:
    """One panel per check: its value as a bar (red: warning), its threshold as a dashed line."""
    fig, axes = plt.subplots(1, len(checks), figsize=(2.8 * len(checks), 3.4))
    for ax, c in zip(axes, checks, strict=True):
        ax.set_title(c.name.replace("_", " "), fontsize=9)
        ax.set_xticks([])
        if math.isnan(c.value):
            ax.text(0.5, 0.5, "n.a.", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        color = {True: "tab:red", False: "tab:green", None: "tab:gray"}[c.warning]
        top = 3 * max(abs(c.threshold), 1e-3)
        shown = c.value if math.isfinite(c.value) else math.copysign(top, c.value)
        ax.bar([0], [shown], color=color, width=0.5)
        ax.axhline(c.threshold, color="k", ls="--", lw=1, label="threshold")
        ax.axhline(0, color="gray", lw=0.6)
        rule = textwrap.fill(f"warns when {c.rule}", 34)
        ax.set_xlabel(f"{c.value:.3g} vs {c.threshold:.3g}\n{rule}", fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, run_dir, PLOT)
