"""Read a rotation saved by pyvene's `IntervenableModel.save`, without importing pyvene.

Layout written by pyvene 0.1.8 (`pyvene/models/intervenable_base.py`, `save`):

- `config.json`: an `IntervenableConfig` (a transformers `PretrainedConfig`) with
  `representations` (one list per intervention in `RepresentationConfig` field order: layer,
  component, unit, max_number_of_units, low_rank_dimension, intervention_type, intervention,
  subspace_partition, group_key, intervention_link_key, moe_key, source_representation,
  hidden_source_representation, latent_dim), `intervention_types` (one
  `"<class 'pyvene.models.interventions.NAME'>"` string per intervention),
  `intervention_dimensions` (each intervention's `interchange_dim`), `sorted_keys`, `mode`.
- `intkey_<key>.bin` per trainable intervention: `torch.save(intervention.state_dict())`. The
  key is `layer_<L>_comp_<component>_unit_<unit>_nunit_<n>#<i>` (`_get_representation_key`;
  `#i` counts repeats of the same location). The rotated-space interventions keep their rotation
  under torch's orthogonal parametrization, so the file holds
  `rotate_layer.parametrizations.weight.original` and `...weight.0.base`, not the rotation;
  plus the buffers `embed_dim` and `interchange_dim`, and for BoundlessRotated
  `intervention_boundaries`, `temperature` and `intervention_population`.

What each intervention patches (pyvene/models/interventions.py), with R = `rotate_layer.weight`:

- RotatedSpaceIntervention: R is d×d; without `subspaces` at call time the first
  `interchange_dim` rotated coordinates are swapped, so the subspace is R[:, :interchange_dim]
  (pyvene's default interchange_dim is the full width; `set_interchange_dim(k)` sets k).
- LowRankRotatedSpaceIntervention: R is d×k (k = low_rank_dimension), output
  base + (source - base) R Rᵀ: the subspace is R.
- BoundlessRotatedSpaceIntervention: R is d×d with a soft mask over the rotated coordinates,
  mask(i) = sigmoid(i / T) · sigmoid((b·d - i) / T), b = clamp(intervention_boundaries, 1e-3, 1).
  mlpim takes the mask's hard limit as T → 0: the k = #{i : i < b·d} first columns of R. pyvene's
  own mask is soft (index 0 is never more than half swapped, sigmoid(0) = 0.5); the record's
  note gives the saved mask's range inside and outside the boundary.

Sites (pyvene/models/gpt2|llama/modelings_intervenable_*.py type_to_module_mapping):
block_input = the block's input (resid_pre), block_output = its output (resid_post),
mlp_output = the MLP module's output (mlp_out), attention_output = the attention module's
output (attn_out), attention_value_output = the input of the attention's output projection, the
heads' values concatenated head-major (z), mlp_activation = the output of the MLP's activation
module (`mlp.act`, `mlp.act_fn`): mlpim's mlp_post only on a non-gated MLP.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from mlpim.engine.readers.record import (
    REQUIREMENTS,
    ForeignDirection,
    agree,
    orthonormal_basis,
    pick,
)
from mlpim.engine.readers.tensor_files import load_torch
from mlpim.errors import MlpimError

FIELDS = tuple(
    "layer component unit max_number_of_units low_rank_dimension intervention_type intervention "
    "subspace_partition group_key intervention_link_key moe_key source_representation "
    "hidden_source_representation latent_dim".split()
)
DEFAULTS = {"layer": 0, "component": "block_output", "unit": "pos", "max_number_of_units": 1}
KINDS = (
    "RotatedSpaceIntervention",
    "LowRankRotatedSpaceIntervention",
    "BoundlessRotatedSpaceIntervention",
)
COMPONENT_SITES = {
    "block_input": "resid_pre",
    "block_output": "resid_post",
    "mlp_output": "mlp_out",
    "attention_output": "attn_out",
    "attention_value_output": "z",
    "mlp_activation": "mlp_post",
}
COMPONENT_REQUIRES = {
    "mlp_activation": {"ungated_mlp"},
    "mlp_output": {"no_post_norm"},
    "attention_output": {"no_post_norm"},
}
NO_SITE = {
    "mlp_input": "the MLP's input after its layer norm",
    "attention_input": "the attention's input after its layer norm",
    "attention_weight": "attention probabilities",
    "query_output": "attention queries",
    "key_output": "attention keys",
    "value_output": "attention values before the heads are mixed",
}
# Module-path components (pyvene hooks any module as "<path>.input" / "<path>.output") that are
# exactly an mlpim site: the input of the MLP's output projection is TransformerLens's
# `mlp.hook_post` (act(gate) * up on a gated MLP, act(pre) otherwise): Llama-family `down_proj`,
# GPT-2 `c_proj`. `layers[20]` and `layers.20` are both pyvene paths.
MODULE_SITES = (
    (re.compile(r"(?:model\.)?layers(?:\[(\d+)\]|\.(\d+))\.mlp\.down_proj\.input"), "mlp_post"),
    (re.compile(r"(?:transformer\.)?h(?:\[(\d+)\]|\.(\d+))\.mlp\.c_proj\.input"), "mlp_post"),
)
ORIGINAL = "rotate_layer.parametrizations.weight.original"
BASE = "rotate_layer.parametrizations.weight.0.base"


@dataclass(frozen=True)
class Entry:
    """One intervention of a saved pyvene folder."""

    key: str
    kind: str
    layer: int
    component: str
    unit: str
    n_units: int
    low_rank: int | None
    partition: object
    interchange_dim: int | None


def _config(folder: Path) -> dict:
    """config.json of a pyvene folder, checked for the fields mlpim reads."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MlpimError(f"{folder}: cannot read config.json as JSON ({e})") from e
    need = ("representations", "intervention_types")
    if not isinstance(cfg, dict) or any(not isinstance(cfg.get(k), list) for k in need):
        raise MlpimError(f"{folder}/config.json is not a pyvene IntervenableConfig (no {need})")
    if len(cfg["representations"]) != len(cfg["intervention_types"]):
        raise MlpimError(f"{folder}/config.json: one intervention type per representation expected")
    return cfg


def _representation(raw, folder: Path) -> dict:
    """A saved RepresentationConfig (list in field order, or dict) as a dict with defaults."""
    if isinstance(raw, list) and len(raw) <= len(FIELDS):
        raw = dict(zip(FIELDS, raw, strict=False))
    if not isinstance(raw, dict):
        raise MlpimError(f"{folder}/config.json: a representation is neither a list nor an object")
    return {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}


def _key(rep: dict, seen: dict[str, int]) -> str:
    """pyvene's `_get_representation_key` for this representation (counts repeats in `seen`)."""
    unit, comp = str(rep["unit"]).replace(".", "_"), str(rep["component"])
    n = rep["max_number_of_units"]
    if "." in comp:
        proposal = f"comp_{comp.replace('.', '_')}_unit_{unit}_nunit_{n}"
    else:
        proposal = f"layer_{rep['layer']}_comp_{comp}_unit_{unit}_nunit_{n}"
    seen[proposal] = seen.get(proposal, -1) + 1
    return f"{proposal}#{seen[proposal]}"


def _kind(type_string) -> str:
    """Class name from a saved type string like "<class 'pyvene.models.interventions.X'>"."""
    found = re.search(r"([A-Za-z_][A-Za-z0-9_]*)'?>?\s*$", str(type_string))
    return found.group(1) if found else str(type_string)


def _entry(rep: dict, kind: str, dim, seen: dict[str, int]) -> Entry:
    return Entry(
        key=_key(rep, seen),
        kind=kind,
        layer=rep["layer"],
        component=str(rep["component"]),
        unit=str(rep["unit"]),
        n_units=rep["max_number_of_units"],
        low_rank=rep.get("low_rank_dimension"),
        partition=rep.get("subspace_partition"),
        interchange_dim=dim if isinstance(dim, int) else None,
    )


def entries(folder: Path) -> list[Entry]:
    """Every intervention of a saved pyvene folder, in pyvene's order."""
    cfg, seen = _config(folder), {}
    reps, types = cfg["representations"], cfg["intervention_types"]
    dims = cfg.get("intervention_dimensions") or [None] * len(reps)
    out = [
        _entry(_representation(raw, folder), _kind(t), dim, seen)
        for raw, t, dim in zip(reps, types, dims, strict=False)
    ]
    saved = cfg.get("sorted_keys")
    if isinstance(saved, list) and set(saved) != {e.key for e in out}:
        raise MlpimError(f"{folder}/config.json: sorted_keys do not match its representations")
    return out


def choose(found: list[Entry], key: str | int | None, folder: Path) -> Entry:
    """The intervention `key` names (full key, key without `#i`, or index); the only one if None."""
    keys = [e.key for e in found]
    if not found:
        raise MlpimError(f"{folder}: the pyvene config lists no intervention")
    if key is None:
        if len(found) == 1:
            return found[0]
        raise MlpimError(
            f"{folder} holds {len(found)} interventions; choose one with direction_key=: {keys}"
        )
    if isinstance(key, str) and key.isdigit():  # an index, given on the command line
        key = int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key < len(found):
            return found[key]
        raise MlpimError(
            f"{folder}: direction_key={key} is not an index 0..{len(found) - 1} of {keys}"
        )
    hits = [e for e in found if str(key) in (e.key, e.key.split("#")[0])]
    if len(hits) == 1:
        return hits[0]
    problem = "names several" if hits else "names none"
    raise MlpimError(f"{folder}: direction_key={key!r} {problem} of its interventions {keys}")


def load_state(path: Path) -> dict[str, Tensor]:
    """A torch.save'd state dict, loaded without running code from the file (weights_only)."""
    if not path.is_file():
        raise MlpimError(
            f"{path}: no such file (pyvene saves one intkey_<key>.bin per intervention)"
        )
    state = load_torch(path, "torch")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise MlpimError(f"{path} does not hold a state dict of tensors")
    return state


class _Holder(nn.Module):
    """A module with one `weight` of pyvene's rotate-layer shape, to carry the parametrization."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.nn.init.orthogonal_(torch.empty(shape)))


def rebuild_rotation(state: dict[str, Tensor], what: str) -> Float[Tensor, "d n"]:
    """The rotation R = rotate_layer.weight, rebuilt by torch's orthogonal parametrization from
    the saved `original` and `base` (pyvene registers it with torch's defaults)."""
    if ORIGINAL not in state or BASE not in state:
        have = ", ".join(sorted(state))
        raise MlpimError(
            f"{what}: no orthogonal parametrization ({ORIGINAL}, {BASE}); found {have}"
        )
    original, base = state[ORIGINAL].to(torch.float32), state[BASE].to(torch.float32)
    if original.dim() != 2:
        raise MlpimError(f"{what}: rotation of shape {tuple(original.shape)} is not a matrix")
    holder = orthogonal(_Holder(tuple(original.shape)))
    try:
        saved = {
            "parametrizations.weight.original": original,
            "parametrizations.weight.0.base": base,
        }
        holder.load_state_dict(saved)
    except RuntimeError as e:
        raise MlpimError(f"{what}: saved parametrization does not fit its rotation ({e})") from e
    with torch.no_grad():
        return orthonormal_basis(holder.weight.detach().clone(), what, rotation=True)


def module_site(comp: str, what: str) -> tuple[str, int]:
    """(mlpim site, layer) of a module-path component that is exactly a site (MODULE_SITES)."""
    for pattern, site in MODULE_SITES:
        found = pattern.fullmatch(comp)
        if found:
            return site, int(found.group(1) or found.group(2))
    named = ", ".join(COMPONENT_SITES)
    exact = "layers[L].mlp.down_proj.input (Llama family), h[L].mlp.c_proj.input (GPT-2)"
    raise MlpimError(
        f"{what}: component {comp!r} is a module path mlpim does not map; it maps the named "
        f"components ({named}) and the module paths {exact}"
    )


def pyvene_site(entry: Entry, what: str) -> tuple[str, int]:
    """(mlpim site, layer) of a pyvene component; a one-line refusal where the spaces differ."""
    comp = entry.component
    if "." in comp:
        _check_units(entry, what)
        return module_site(comp, what)  # pyvene ignores `layer` for a module path
    if comp.startswith("head_"):
        raise MlpimError(f"{what}: component {comp!r} patches single heads, not a whole site")
    if comp in NO_SITE:
        raise MlpimError(f"{what}: component {comp!r} ({NO_SITE[comp]}) has no mlpim site")
    if comp not in COMPONENT_SITES:
        named = ", ".join(COMPONENT_SITES)
        raise MlpimError(f"{what}: unknown pyvene component {comp!r}; mlpim maps {named}")
    _check_units(entry, what)
    if not isinstance(entry.layer, int) or isinstance(entry.layer, bool):
        raise MlpimError(f"{what}: layer {entry.layer!r} is not an integer")
    return COMPONENT_SITES[comp], entry.layer


def _check_units(entry: Entry, what: str) -> None:
    """mlpim reads interventions on one position ('pos', 1 unit)."""
    if entry.unit != "pos" or entry.n_units != 1:
        units = f"unit={entry.unit!r}, max_number_of_units={entry.n_units}"
        raise MlpimError(f"{what}: {units}; mlpim reads interventions on one position ('pos', 1)")


def _rotated(entry: Entry, rot: Tensor, state: dict, what: str) -> tuple[Tensor, str]:
    d = rot.shape[0]
    k = entry.interchange_dim
    if k is None and "interchange_dim" in state:
        k = int(state["interchange_dim"].flatten()[0])
    if k is None or not 1 <= k <= d:
        raise MlpimError(f"{what}: interchange_dim {k!r} is not in 1..{d}")
    full = " (pyvene's default: every coordinate, a full patch)" if k == d else ""
    return rot[:, :k], f"RotatedSpace: the first interchange_dim={k} of {d} rotated columns{full}"


def _low_rank(entry: Entry, rot: Tensor, what: str) -> tuple[Tensor, str]:
    if entry.low_rank is not None and entry.low_rank != rot.shape[1]:
        shape = f"low_rank_dimension {entry.low_rank}, rotation d×{rot.shape[1]}"
        raise MlpimError(f"{what}: {shape} do not agree")
    return rot, f"LowRankRotated: all low_rank_dimension={rot.shape[1]} columns"


def _boundless(rot: Tensor, state: dict, what: str) -> tuple[Tensor, str]:
    if "intervention_boundaries" not in state or "temperature" not in state:
        raise MlpimError(f"{what}: BoundlessRotated without intervention_boundaries/temperature")
    d = rot.shape[0]
    b = float(state["intervention_boundaries"].flatten()[0].clamp(1e-3, 1))
    temp = float(state["temperature"])
    pop = state.get("intervention_population", torch.arange(d)).to(torch.float64)
    k = int((pop < b * d).sum())
    mask = torch.sigmoid(pop / temp) * torch.sigmoid((b * d - pop) / temp)
    inside, outside = mask[pop < b * d], mask[pop >= b * d]
    out_max = f"{float(outside.max()):.2f}" if len(outside) else "none"
    soft = f"{float(inside.min()):.2f}..{float(inside.max()):.2f} inside, max {out_max} outside"
    note = (
        f"BoundlessRotated: boundary b={b:.4g} of width {d} -> the first k={k} rotated columns "
        f"(the mask's hard limit); pyvene's soft mask at temperature {temp:.3g} is {soft}"
    )
    return rot[:, :k], note


def _basis(entry: Entry, rot: Tensor, state: dict, columns, what: str) -> tuple[Tensor, str]:
    """The subspace the intervention patches (or the chosen `columns` of its rotation), and why."""
    if columns is not None:
        chosen = pick(columns, rot.shape[1], f"{what}: direction_columns")
        return rot[:, chosen], f"{entry.kind}: rotation columns {chosen} (chosen by the user)"
    if entry.partition is not None:
        part = f"subspace_partition {entry.partition}"
        raise MlpimError(
            f"{what}: with {part} the patched columns are chosen per call; give direction_columns="
        )
    if entry.kind == "LowRankRotatedSpaceIntervention":
        return _low_rank(entry, rot, what)
    if entry.kind == "RotatedSpaceIntervention":
        return _rotated(entry, rot, state, what)
    return _boundless(rot, state, what)


def read_pyvene(
    folder: str | Path,
    key: str | int | None = None,
    columns: list[int] | None = None,
    site: str | None = None,
    layer: int | None = None,
    gated_mlp: bool | None = None,
) -> ForeignDirection:
    """The subspace of one rotated-space intervention of a folder saved by pyvene's `save`.

    `key` chooses the intervention when there are several; `columns` picks rotation columns
    instead of the ones pyvene patches by default; `site`/`layer`, if given, must agree with the
    folder's; `gated_mlp=True` refuses mlp_activation at once (else `check_fits` does).
    """
    folder = Path(folder)
    entry = choose(entries(folder), key, folder)
    what = f"{folder} [{entry.key}]"
    if entry.kind not in KINDS:
        raise MlpimError(f"{what} is a {entry.kind}; mlpim reads {', '.join(KINDS)}")
    found_site, found_layer = pyvene_site(entry, what)
    if gated_mlp and entry.component == "mlp_activation":
        raise MlpimError(f"{what}: {REQUIREMENTS['ungated_mlp']}")
    state = load_state(folder / f"intkey_{entry.key}.bin")
    rot = rebuild_rotation(state, what)
    if "embed_dim" in state and int(state["embed_dim"]) != rot.shape[0]:
        raise MlpimError(f"{what}: embed_dim {int(state['embed_dim'])} but {rot.shape[0]} rows")
    basis, note = _basis(entry, rot, state, columns, what)
    return ForeignDirection(
        basis=basis.contiguous(),
        site=agree(found_site, site, "site", what),
        layer=agree(found_layer, layer, "layer", what),
        fmt="pyvene",
        kind=entry.kind,
        origin=entry.component if "." in entry.component else f"{entry.component} L{entry.layer}",
        note=note,
        path=str(folder),
        requires=frozenset(COMPONENT_REQUIRES.get(entry.component, set()) | {"raw_activations"}),
    )
