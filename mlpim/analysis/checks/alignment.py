"""Information: |cos(W_out·v, v_ref)| against random hidden directions (never warns); for a k-dim
subspace V, the largest |cos| of v_ref with what V writes, against random k-dim subspaces."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis import nullspace as ns
from mlpim.analysis.checks.base import Check, Spec, register
from mlpim.analysis.references import Reference


def alignment_check(
    v: Float[Tensor, "m ..."],
    w_out: Float[Tensor, "m d"],
    v_ref: Float[Tensor, " d"],
    n_random: int,
    seed: int,
) -> Check:
    """Information: |cos(W_out·v, v_ref)| against random hidden directions' 95th percentile (a
    basis v, m×k: the largest |cos| in its written span, against random k-dim subspaces)."""
    gen, k = torch.Generator().manual_seed(seed), 1 if v.ndim == 1 else v.shape[1]
    if k == 1:
        cos = abs(ns.cosine(ns.written(v.reshape(-1), w_out), v_ref))
        rand = ns.random_output_cosines(w_out, v_ref, n_random, gen).abs()
    else:
        cos = ns.subspace_cosine(ns.written(v.T, w_out), v_ref)
        rand = ns.random_output_alignments(w_out, v_ref, n_random, k, gen)
    q95 = rand.quantile(0.95).item()
    what = "hidden directions" if k == 1 else f"{k}-dim hidden subspaces"
    ref = Reference(f"random {what} (n={n_random})", tuple(rand.tolist()))
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
