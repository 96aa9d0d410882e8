"""The dormant pathway (ioi_dormant): the middle MLP's END output projected on v_true, with and
without the v_MLP patch, for prompts with disjoint names (ABB/BAB vs CDD/DCD, both ways)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import nullspace as ns
from mlpim.engine import fastpath
from mlpim.engine.interventions import Prepared
from mlpim.engine.patching import subspace_patch
from mlpim.tasks.ioi import s1_position

NAMED = ("ABB", "BAB")  # the base-side names
FRESH = ("CDD", "DCD")  # disjoint names


def dormant_combos() -> list[tuple[str, str]]:
    """(base, source) pairs: ABB/BAB from CDD/DCD and the reverse; half of them same-position."""
    into_named = [(b, s) for b in NAMED for s in FRESH]
    return into_named + [(b, s) for b in FRESH for s in NAMED]


def combo_name(base: str, source: str) -> str:
    """The post's label `source->base` (e.g. DCD->ABB: patch from DCD into ABB)."""
    return f"{source}->{base}"


def same_position(base: str, source: str) -> bool:
    """Both prompts repeat the name in one place: the patch should change nothing."""
    return s1_position(base) == s1_position(source)


def mlp_out_projection(
    model, layer: int, post: Float[Tensor, "b m"], v_true: Float[Tensor, "d k"]
) -> Float[Tensor, b]:
    """The MLP's END output (from its hidden activations) projected on v_true's first column."""
    return ns.projections(fastpath.mlp_out_from_post(model, layer, post), v_true[:, 0])


def combo_projections(
    model, prepared: list[Prepared], layer: int, v_mlp: Tensor, v_true: Tensor
) -> tuple[Float[Tensor, n], Float[Tensor, n]]:
    """(patched, unpatched) projections of the MLP output on v_true over all pairs of a combo."""
    patched, clean = [], []
    with torch.no_grad():
        for p in prepared:
            moved = subspace_patch(p.base_act, p.source_act, v_mlp)
            patched.append(mlp_out_projection(model, layer, moved, v_true))
            clean.append(mlp_out_projection(model, layer, p.base_act, v_true))
    return torch.cat(patched).cpu(), torch.cat(clean).cpu()


def projection_stats(patched: Tensor, clean: Tensor) -> dict[str, dict[str, float]]:
    """proj_mean/proj_std per intervention and the dormant ratio |mean patched| / std unpatched."""
    ratio = patched.mean().abs().item() / max(clean.std().item(), 1e-12)
    das = {"proj_mean": patched.mean().item(), "proj_std": patched.std().item()}
    return {
        "clean": {"proj_mean": clean.mean().item(), "proj_std": clean.std().item()},
        "das": das | {"dormant_ratio": ratio},
    }


def layer_note(mlp_layer: int, resid_layer: int) -> str:
    """Whether MLP `mlp_layer`'s output is part of resid_post `resid_layer` at all."""
    if mlp_layer <= resid_layer:
        return f"MLP {mlp_layer} writes into the residual before resid_post {resid_layer}."
    return (
        f"WARNING: MLP {mlp_layer} comes after resid_post {resid_layer}: its output is not part "
        "of the residual that v_true was found in; the projection is computed anyway."
    )
