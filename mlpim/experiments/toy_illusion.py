"""toy_illusion: the post's 3-neuron toy model of the illusion; no language model is loaded.

1. the post's two patching tables (e1 and v = (e2+e3)/√2), plus the full hidden patch;
2. the appendix's rotated basis, each direction classified as correlated / causal by measurement;
3. DAS (d=3, k=1) from `extra.n_seeds` seeds: how often it lands on e1 vs an illusory direction;
4. the k-dim construction (k irrelevant + k dormant + 1 real neuron) for k in `extra.ks`.
Writes toy_tables.md (the tables, printed too), das_seeds.csv and toy_illusion.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from omegaconf import DictConfig

from mlpim.analysis import toy
from mlpim.report import io

MODEL_NAME = "toy_linear"
KEYS = {"site": "hidden", "layer": 0, "split": "all"}
CATEGORY_COLORS = {"e1": "tab:blue", "illusory": "tab:red", "other": "tab:gray", "failed": "k"}


def pair_name(base_x: float, source_x: float) -> str:
    return f"{toy.fmt_num(base_x)}<-{toy.fmt_num(source_x)}".replace("−", "-")


def table_rows(model: toy.ToyModel) -> list[dict]:
    """Per intervention and pair: hidden and output before/after; per intervention: rates."""
    rows = []
    directions = {**toy.post_directions(), "full": toy.full_basis(model.d)}
    for name, u in directions.items():
        patches = toy.patch_pairs(model, u)
        for p in patches:
            values = {"output_before": p.output_before, "output_after": p.output_after,
                      "source_output": p.source_output}  # fmt: skip
            values |= {f"hidden_before_{i + 1}": v for i, v in enumerate(p.hidden_before.tolist())}
            values |= {f"hidden_after_{i + 1}": v for i, v in enumerate(p.hidden_after.tolist())}
            rows += io.metric_rows(values, intervention=name, **KEYS, part="tables",
                                   pair=pair_name(p.base_x, p.source_x))  # fmt: skip
        rates = {
            "flip_rate": sum(p.output_after * p.source_x > 0 for p in patches) / len(patches),
            "iia": sum(abs(p.output_after - p.source_output) < 1e-9 for p in patches)
            / len(patches),
            "dormant_activation": max(abs(p.hidden_after[2].item()) for p in patches),
        }
        rows += io.metric_rows(rates, intervention=name, **KEYS, part="tables", pair="all")
    return rows


def classification_rows(frame: pd.DataFrame, basis: str) -> list[dict]:
    rows = []
    for r in frame.to_dict("records"):
        values = {k: v for k, v in r.items() if k not in ("direction", "role")}
        rows += io.metric_rows(values, intervention=r["direction"], **KEYS, part=basis, pair="all")
    return rows


def das_rows(seeds: pd.DataFrame) -> list[dict]:
    rows = []
    metrics = ["loss", "iia", "flip_rate", "abs_cos_e1", "abs_cos_v", "abs_cos_w_in",
               "dormant_share"]  # fmt: skip
    for r in seeds.to_dict("records"):
        values = {m: r[m] for m in metrics}
        values |= {"is_e1": float(r["category"] == "e1"),
                   "is_illusory": float(r["category"] == "illusory"),
                   "is_not_e1": float(r["iia"] == 1 and r["abs_cos_e1"] < 0.9)}  # fmt: skip
        rows += io.metric_rows(values, intervention="das", **KEYS, part="das", seed=r["seed"])
    return rows


def higher_dim_rows(frame: pd.DataFrame) -> list[dict]:
    rows = []
    for r in frame.to_dict("records"):
        values = {m: r[m] for m in ("output_after", "iia", "flip_rate", "dormant_activation")}
        name = f"{r['intervention']}_k{r['k']}"  # distinct from the 3-D model's interventions
        rows += io.metric_rows(values, intervention=name, **KEYS, part="higher_dim",
                               k=r["k"], hidden_dim=r["d"], subspace_dim=r["subspace_dim"])  # fmt: skip
    return rows


def plot(model: toy.ToyModel, seeds: pd.DataFrame, hd: pd.DataFrame, run_dir: Path) -> None:
    """(a) hidden activations before/after the e1 and v patches; (b) DAS solutions' |cos e1|
    per seed; (c) output after each patch in the k-dim construction."""
    fig = plt.figure(figsize=(17, 4.8))
    ax = fig.add_subplot(1, 3, 1, projection="3d")
    data = model.hidden(toy.vec(*toy.XS))
    ax.scatter(*data.T.tolist(), c="k", s=50, label="data h(x), x = ±1")
    for name, color in (("e1", "tab:blue"), ("v_illusory", "tab:red")):
        for i, p in enumerate(toy.patch_pairs(model, toy.post_directions()[name])):
            (a, b) = p.hidden_before.tolist(), p.hidden_after.tolist()
            ax.quiver(*a, *(y - x for x, y in zip(a, b, strict=True)), color=color,
                      arrow_length_ratio=0.15)  # fmt: skip
            ax.scatter(*b, c=color, s=40, label=f"after patch along {name}" if i == 0 else None)
    ax.set(xlabel="e1 (real)", ylabel="e2 (irrelevant)", zlabel="e3 (dormant)",
           title="hidden activation: patch along e1 vs v")  # fmt: skip
    ax.legend(fontsize=7, loc="upper left")

    ax = fig.add_subplot(1, 3, 2)
    s = seeds.sort_values("abs_cos_e1").reset_index(drop=True)
    ax.bar(s.index, s.abs_cos_e1, color=[CATEGORY_COLORS[c] for c in s.category])
    ax.axhline(0.9, ls="--", c="k", lw=0.8)
    for cat, color in CATEGORY_COLORS.items():
        n = int((s.category == cat).sum())
        if n:
            ax.bar([0], [0], color=color, label=f"{cat} ({n})")
    ax.set(xlabel="DAS seed (sorted)", ylabel="|cos(u, e1)|", ylim=(0, 1.05),
           title=f"DAS on the toy: {len(s)} seeds, all IIA = {s.iia.min():.0%}")  # fmt: skip
    ax.legend(fontsize=8)

    ax = fig.add_subplot(1, 3, 3)
    wide = hd.pivot_table(index="intervention", columns="k", values="output_after", sort=False)
    wide.plot.bar(ax=ax, rot=20)
    ax.axhline(0, c="k", lw=0.6)
    ax.set(ylabel="output after patch into x=1 from x'=−1", xlabel="",
           title="k irrelevant + k dormant + 1 real neuron")  # fmt: skip
    ax.legend(title="k", fontsize=8)
    fig.tight_layout()
    io.save_figure(fig, run_dir, "toy_illusion.png")


def run(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    extra = cfg.extra
    model = toy.post_model()
    sections = []

    tables = toy.post_tables(model)
    full = toy.patch_table(toy.patch_pairs(model, toy.full_basis(model.d)))
    sections += [
        "## The post's tables (W_in = (1, 1, 0), W_out = (1, 0, 2))",
        "### Patching along e1\n\n" + tables["e1"],
        "### Patching along v = (e2 + e3)/√2\n\n" + tables["v_illusory"],
        "### Full patch of the hidden layer (not in the post)\n\n" + full,
    ]

    standard = toy.classification_frame(model, toy.standard_directions())
    rotated = toy.classification_frame(model, toy.rotated_basis())
    sections += [
        "## Correlated / causal, measured\n\nStandard basis:\n\n"
        + toy.classification_table(standard),
        "The appendix's rotated basis:\n\n" + toy.classification_table(rotated),
    ]

    seeds = toy.das_seeds(
        model, n_seeds=int(extra.n_seeds), seed0=int(cfg.seed) * 1000,
        steps=int(extra.das_steps), lr=float(extra.das_lr),
        tol=float(extra.iia_tol),
    )  # fmt: skip
    io.write_csv(seeds, run_dir, "das_seeds.csv")
    sections.append("## DAS on the toy model\n\n" + toy.das_table(toy.das_summary(seeds)))

    ks = [int(k) for k in extra.ks]
    hd = pd.concat(
        [toy.higher_dim_measures(toy.higher_dim(k, int(extra.extra_dims))) for k in ks],
        ignore_index=True,
    )
    sections.append("## Higher dimensions\n\n" + toy.higher_dim_table(hd))

    text = "\n\n".join(sections) + "\n"
    print(text)
    io.write_text(text, run_dir, "toy_tables.md")

    rows = table_rows(model)
    rows += classification_rows(standard, "standard_basis")
    rows += classification_rows(rotated, "rotated_basis")
    rows += das_rows(seeds) + higher_dim_rows(hd)
    df = io.tidy(rows, cfg)
    df["model"] = MODEL_NAME
    plot(model, seeds, hd, run_dir)
    return df
