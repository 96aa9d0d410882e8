"""illusion_check: which warning signs of the MLP-in-the-middle illusion does a saved direction show?

The direction (`direction=path/to/subspace.pt`, required) must be 1-D: a k-D subspace is refused
(save one column to check it). Its site and layer are read from the file (`site=` is ignored).
The checks (`mlpim.analysis.illusion`, run by `mlpim.analysis.planted.measure_checks`) are
measured on the task's test pairs (IOI: the paper's pairs), each against a reference measured on
the same model, site and task (`mlpim.analysis.references`): random unit directions
(`extra.n_random_directions`), DAS on norm-matched random MLPs (`extra.random_mlp_seeds`) and the
site's directions of natural variation (`extra.n_natural`). Thresholds: `check.*`.

Writes metrics.csv, verdict.md (also as summary.md), illusion_check.png (one panel per check: the
value against its reference distribution and threshold); prints the verdict table.
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from jaxtyping import Float
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from mlpim import constants as C
from mlpim.analysis import illusion
from mlpim.analysis import references as R
from mlpim.analysis.controls import loaded_basis
from mlpim.analysis.planted import measure_checks
from mlpim.engine.models import ConfigError, site_width, validate_site
from mlpim.engine.subspace import load_subspace
from mlpim.experiments.common import model_for, paper_splits
from mlpim.report import io

log = logging.getLogger(__name__)
PLOT = "illusion_check.png"
RESID_KINDS = ("resid_pre", "resid_post")
CHECK_METRICS = ("check_value", "threshold", "warning", "margin", "spread", "percentile", "z",
                 "borderline")  # fmt: skip


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


def reference_direction(cfg: DictConfig, model) -> Tensor | None:
    """The saved 1-D residual direction `extra.resid_direction` (None when not given)."""
    path = cfg.extra.resid_direction
    return saved_direction(path, model, cfg.model.name, RESID_KINDS)[2] if path else None


def thresholds(cfg: DictConfig) -> illusion.Thresholds:
    """`check.*` as `Thresholds`."""
    return illusion.Thresholds(**OmegaConf.to_container(cfg.check, resolve=True))


def ref_options(cfg: DictConfig, kind: str) -> R.RefOptions:
    """How much of each reference to measure (`extra.*`); no random MLP off MLP hidden sites."""
    seeds = int(cfg.extra.random_mlp_seeds) if kind == "mlp_post" else 0
    return R.RefOptions(int(cfg.extra.n_random_directions), int(cfg.extra.n_natural), seeds,
                        cfg.extra.random_mlp_epochs, int(cfg.seed))  # fmt: skip


def references(cfg, model, splits, kind: str, layer: int, run_dir: Path, th) -> tuple[list, R.Refs]:
    """The site's references: random and natural directions, random-MLP DAS (rows too)."""
    opts = ref_options(cfg, kind)
    refs = R.site_references(model, splits, kind, layer, opts, th.superadditive)
    if kind != "mlp_post":
        return [], refs
    rows, rand_mlp = R.random_mlp_reference(cfg, model, splits, layer, opts, run_dir)
    return rows, R.Refs(refs.random_dirs, rand_mlp, refs.natural_dormant, refs.natural_bridging)


def check_rows(checks: list[illusion.Check], keys: dict) -> list[dict]:
    """Each check as tidy rows (`CHECK_METRICS`; warning and borderline 1/0/NaN), the verdict."""
    rows = []
    for c in checks:
        warn = math.nan if c.warning is None else float(c.warning)
        border = math.nan if c.warning is None else float(c.borderline)
        values = (c.value, c.threshold, warn, c.margin, c.spread, c.percentile, c.z, border)
        rows += io.metric_rows(dict(zip(CHECK_METRICS, values, strict=True)),
                               intervention=c.name, split="test", **keys)  # fmt: skip
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
    th, keys = thresholds(cfg), {"site": kind, "layer": layer, "dim": 1, "seed": cfg.seed}
    steps = tqdm(total=3, desc="illusion_check", unit="step")
    steps.set_postfix_str("prepare pairs")
    splits = paper_splits(cfg, model, kind, layer, held_out=True)
    steps.update()
    steps.set_postfix_str("reference distributions")
    ref_rows, refs = references(cfg, model, splits, kind, layer, run_dir, th)
    steps.update()
    steps.set_postfix_str("checks")
    n_align = int(cfg.extra.n_random)
    rows, checks = measure_checks(model, splits, kind, layer, v, refs, th, keys, v_ref, n_align)
    steps.update()
    steps.close()
    df = io.tidy(rows + ref_rows + check_rows(checks, keys), cfg)
    text = verdict_markdown(cfg, kind, layer, checks)
    for name in (C.VERDICT, C.SUMMARY):
        io.write_text(text, run_dir, name)
    name = "/".join(Path(cfg.direction).parts[-2:])
    verdict_plot(checks, run_dir, f"{cfg.experiment}: {name} ({cfg.model.name}, {kind} L{layer})")
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """The verdict table from a metrics table: one row per check and the verdict."""
    wide = df[df.metric.isin(CHECK_METRICS)].pivot_table(
        index="intervention", columns="metric", values="value", dropna=False
    )
    names = [n for n in illusion.CHECKS if n in wide.index]
    flags = []
    for n in names:
        w, b = wide.loc[n, "warning"], wide.loc[n, "borderline"]
        flags.append((None if math.isnan(w) else bool(w), bool(b == 1)))
    table = pd.DataFrame({
        "value": wide.loc[names, "check_value"], "threshold": wide.loc[names, "threshold"],
        "margin": wide.loc[names, "margin"], "percentile": wide.loc[names, "percentile"],
        "z": wide.loc[names, "z"], "warning": [word(n, f, wide) for n, f in zip(names, flags, strict=True)],
    })  # fmt: skip
    effect = tuple(wide.loc["effect", ["check_value", "threshold"]]) if "effect" in names else None
    n, label = illusion.verdict_of(flags, effect)
    table.loc["verdict"] = [float(n), math.nan, math.nan, math.nan, math.nan, label]
    table.index.name = "check"
    return table


def word(name: str, flag: tuple[bool | None, bool], wide: pd.DataFrame) -> str:
    """yes / no[, borderline] / info / n.a. from the stored flags."""
    warn, border = flag
    if warn is None:
        return illusion.NA if math.isnan(wide.loc[name, "check_value"]) else "info"
    w = "yes" if warn else "no"
    return f"{w}, {illusion.BORDERLINE}" if border else w


def verdict_markdown(cfg: DictConfig, kind: str, layer: int, checks: list[illusion.Check]) -> str:
    """The one page to read: the verdict, the table, and the numbers and reference of each row."""
    n, label = illusion.verdict(checks)
    details = "\n".join(f"- **{c.name}**: {row_detail(c)}" for c in checks)
    table = illusion.verdict_table(checks).drop(columns=["spread", "meaning"])
    return (
        f"# {cfg.experiment}: {label}\n\nmodel: {cfg.model.name}; direction: {cfg.direction} "
        f"({kind}, layer {layer}); seed {cfg.seed}; FLDDs on the test pairs\n\n"
        f"{n} warning sign(s): **{label}**.\n\n{io.markdown_table(table)}\n\n"
        "margin: distance from the threshold, positive on the warning side; a warning decision "
        "whose |margin| is below its reference's spread is *borderline*. percentile and z: where "
        "the check's number falls in its reference distribution (measured on the same model, "
        f"site and task).\n\n{details}\n"
    )


def row_detail(c: illusion.Check) -> str:
    """One line: the numbers, the rule, the reference and the spread."""
    out = c.detail
    if c.rule != illusion.NA:
        out += f"; warns when {c.rule}"
    if c.reference is not None and c.reference.values:
        placed = c.value if c.placed is None else c.placed
        out += (f"; {placed:.3g} placed in {c.reference.name}: percentile {c.percentile:.0f}, "
                f"z {c.z:.2f}")  # fmt: skip
    if math.isfinite(c.spread):
        out += f"; spread {c.spread:.3g} vs margin {c.margin:.3g}"
    return out


def verdict_plot(checks: list[illusion.Check], run_dir: Path, title: str) -> None:
    """One panel per check: its reference distribution (dots), the direction's number (red:
    warning), the threshold (dashed) where it is on the same scale."""
    fig, axes = plt.subplots(1, len(checks), figsize=(2.6 * len(checks), 3.6))
    for ax, c in zip(axes, checks, strict=True):
        ax.set_title(c.name.replace("_", " "), fontsize=8)
        ax.set_xticks([])
        if math.isnan(c.value):
            ax.text(0.5, 0.5, "n.a.", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        panel(ax, c)
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, run_dir, PLOT)


def panel(ax, c: illusion.Check) -> None:
    """The reference as jittered dots, the direction's number as a bar, the threshold as a line."""
    placed = c.value if c.placed is None else c.placed
    ref = c.reference.finite() if c.reference is not None else np.array([])
    top = 3 * max(abs(c.threshold), 1e-3) if math.isfinite(c.threshold) else 1.0
    shown = placed if math.isfinite(placed) else math.copysign(max(top, *abs(ref), 1.0), placed)
    if ref.size:
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, ref.size)
        ax.scatter(1 + jitter, ref, s=6, color="tab:blue", alpha=0.6, label="reference")
    color = {True: "tab:red", False: "tab:green", None: "tab:gray"}[c.warning]
    ax.bar([0], [shown], color=color, width=0.5, label="this direction")
    if c.placed is None and math.isfinite(c.threshold):  # threshold on the placed scale
        ax.axhline(c.threshold, color="k", ls="--", lw=1, label="threshold")
    elif c.placed is not None and c.name == "nullspace_bridging":
        ax.axhline(0, color="k", ls="--", lw=1, label="threshold")  # placed: the margin
    ax.axhline(0, color="gray", lw=0.5)
    rule = textwrap.fill(f"warns when {c.rule}", 32)
    ax.set_xlabel(f"{c.value:.3g} vs {c.threshold:.3g} ({illusion.warning_word(c)})\n"
                  f"pct {c.percentile:.0f}, z {c.z:.2f}\n{rule}", fontsize=6)  # fmt: skip
