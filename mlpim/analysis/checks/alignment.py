"""Information: |cos(W_out·v, v_ref)| against random hidden directions (never warns)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import nullspace as ns
from mlpim.analysis.checks.base import Check, Spec, register
from mlpim.analysis.references import Reference


def alignment_check(
    v: Float[Tensor, " m"],
    w_out: Float[Tensor, "m d"],
    v_ref: Float[Tensor, " d"],
    n_random: int,
    seed: int,
) -> Check:
    """Information: |cos(W_out·v, v_ref)| against random hidden directions' 95th percentile."""
    cos = abs(ns.cosine(ns.written(v, w_out), v_ref))
    gen = torch.Generator().manual_seed(seed)
    rand = ns.random_output_cosines(w_out, v_ref, n_random, gen).abs()
    q95 = rand.quantile(0.95).item()
    ref = Reference(f"random hidden directions (n={n_random})", tuple(rand.tolist()))
    return Check(
        "alignment",
        cos,
        q95,
        None,
        "never (information only)",
        f"|cos| {cos:.3f}, random q95 {q95:.3f} (n={n_random})",
        reference=ref,
    )


SPEC = register(
    Spec(
        name="alignment",
        order=60,
        scope="info",
        meaning="info: cos(W_out v, v_ref) vs random directions",
        judge=alignment_check,
        on_value_scale=True,
    )
)
