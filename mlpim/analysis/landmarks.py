"""IOI landmarks by a stated rule, from an `ioi_locate` metrics table.

The rule (`find_landmarks`): the position signal ("which name is repeated") is written into the
END residual by attention (the S-inhibition heads) and read from it by later heads (the name
movers). `mlp_in_the_middle` is the MLP of the LAST block L whose attention output carries the
signal: patching attn_out L at END (ABB<->BAB) has FLDD >= `threshold` (default 0.2), and the
residual after that block carries it too (resid_post L FLDD >= `threshold`). That is the block
of the S-inhibition heads; its MLP sits after the writers and before the readers, like MLP8 in
GPT-2 small. `handover_layer` is that block's resid_post (L).

GPT-2 small (from the paper and Wang et al. 2022; not run here, no weights): the S-inhibition
heads are 7.3, 7.9, 8.6 and 8.10, so attention writes the signal in blocks 7 and 8, the name
movers 9.6, 9.9 and 10.0 read it, and the full resid_post 8 patch has FLDD 1.236 (paper): the
last writing block is 8, so the rule gives MLP8 and resid_post 8, the paper's sites. Name movers
copy the IO name, which ABB and BAB share, so their own attention outputs barely move LD under
this patch and do not end the window early. SmolLM2-135M (README, ioi_locate): attn_out FLDD
0.18 at L19, 0.78 at L20, -0.07 at L21; resid_post 1.03 at L20: the rule gives 20.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

if TYPE_CHECKING:
    import pandas as pd

COMPONENTS_NEEDED = ("attn_out", "resid_post")


@dataclass
class Landmarks:
    """Where a model's IOI circuit hands over; also the schema of `model.landmarks`."""

    handover_layer: int | None = None  # resid layer after S-inhibition heads, before name movers
    mlp_in_the_middle: int | None = None  # the MLP between them
    name_movers: list[Any] = field(default_factory=list)  # [[layer, head], ...]


def component_fldd(df: pd.DataFrame) -> pd.DataFrame:
    """layer × component FLDD of the full-component patches (head -1) of an ioi_locate table."""
    rows = df[df.metric == "fldd"]
    if "head" in rows:
        rows = rows[rows["head"].fillna(-1) < 0]
    if "split" in rows and (rows.split == "test").any():
        rows = rows[rows.split == "test"]
    comp = rows.pivot_table(index="layer", columns="site", values="value")
    missing = [c for c in COMPONENTS_NEEDED if c not in comp]
    if missing:
        raise ValueError(f"not an ioi_locate table: no FLDD rows for {', '.join(missing)}")
    return comp.sort_index()


def name_movers(
    df: pd.DataFrame, after: int, threshold: float = 0.05, n: int = 3
) -> list[list[int]]:
    """Up to `n` heads in layers after `after` whose own patch moves LD most (FLDD >= threshold).

    Under ABB<->BAB patching a name mover's output is the same name in both runs, so this list is
    often empty; `ioi_path_patching` (query-input patching) is the better way to find them."""
    heads = df[(df.metric == "fldd") & (df.site == "z")]
    if "head" not in heads or heads.empty:
        return []
    heads = heads[(heads.layer > after) & (heads["head"] >= 0) & (heads.value >= threshold)]
    top = heads.sort_values("value", ascending=False).head(n)
    return [[int(r.layer), int(r["head"])] for _, r in top.iterrows()]


def find_landmarks(df: pd.DataFrame, threshold: float = 0.2) -> Landmarks | None:
    """The landmarks the rule gives (see the module docstring); None when no block qualifies.

    `df`: the tidy table ioi_locate writes (columns site, layer, head, metric, value)."""
    comp = component_fldd(df)
    writes = comp.index[(comp.attn_out >= threshold) & (comp.resid_post >= threshold)]
    if len(writes) == 0:
        return None
    layer = int(max(writes))
    return Landmarks(layer, layer, name_movers(df, after=layer))


def signal_range(df: pd.DataFrame, threshold: float = 0.2) -> tuple[int, int] | None:
    """(first, last) layer of the signal: the first whose attn_out or resid_post patch has FLDD
    >= threshold, the last whose resid_post does; None when no layer does."""
    comp = component_fldd(df)
    first = comp.index[(comp.attn_out >= threshold) | (comp.resid_post >= threshold)]
    last = comp.index[comp.resid_post >= threshold]
    if len(first) == 0 or len(last) == 0:
        return None
    return int(min(first)), int(max(last))


def landmarks_yaml(lm: Landmarks | None, threshold: float, model: str) -> str:
    """The landmarks as a `landmarks:` block for a model config, with the rule as a comment."""
    head = (
        f"# {model}: landmarks by the rule of mlpim/analysis/landmarks.py: the last block whose\n"
        f"# attn_out and resid_post patches at END both have FLDD >= {threshold} (ioi_locate)\n"
    )
    if lm is None:
        return head + "# no block passes the threshold: set site.layer by hand\nlandmarks: null\n"
    return head + OmegaConf.to_yaml({"landmarks": asdict(lm)})


def landmarks_line(lm: Landmarks | None, threshold: float) -> str:
    """A one-line description of what the rule found (logged by ioi_locate)."""
    if lm is None:
        return f"landmarks: no block has attn_out and resid_post FLDD >= {threshold}"
    return (
        f"landmarks (attn_out and resid_post FLDD >= {threshold}): mlp_in_the_middle="
        f"{lm.mlp_in_the_middle}, handover_layer={lm.handover_layer}, "
        f"name_movers={lm.name_movers} (landmarks.yaml)"
    )
