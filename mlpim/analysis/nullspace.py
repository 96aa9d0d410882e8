"""The nullspace split of an MLP direction, and how its output aligns with a residual direction.

An MLP maps its hidden activations h (width m = d_mlp) to its output h @ W_out (+ b_out), with
W_out of shape [m, d_model]. The *row space* of W_out (the paper's term, for W_out as the map
hidden -> residual) is the span of the hidden directions W_out reads, i.e. the column span of the
[m, d] matrix here; its orthogonal complement, the nullspace, is every n with n @ W_out = 0.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def mlp_w_out(model, layer: int) -> Float[Tensor, "m d"]:
    """W_out of block `layer`'s MLP as [d_mlp, d_model] (hidden @ W_out = output minus bias)."""
    return model.blocks[layer].mlp.W_out.detach()


def mlp_b_out(model, layer: int) -> Float[Tensor, " d"] | None:
    """b_out of block `layer`'s MLP; None for a bias-free projection (Llama)."""
    b = model.blocks[layer].mlp.b_out
    return None if b is None else b.detach()


def mlp_output(
    post: Float[Tensor, "b m"], w_out: Float[Tensor, "m d"], b_out: Float[Tensor, " d"] | None
) -> Float[Tensor, "b d"]:
    """The MLP output written by hidden activations `post`."""
    out = post @ w_out
    return out if b_out is None else out + b_out


def row_space_basis(w_out: Float[Tensor, "m d"], rtol: float | None = None) -> Float[Tensor, "m r"]:
    """Orthonormal basis of the hidden directions W_out reads (its numerical rank r columns).

    For a full-rank W_out this spans the same space as Q of torch.linalg.qr(W_out); the SVD also
    drops numerically null directions (centred writing weights make W_out rank d_model - 1).
    """
    u, s, _ = torch.linalg.svd(w_out.double(), full_matrices=False)
    if rtol is None:
        rtol = max(w_out.shape) * torch.finfo(w_out.dtype).eps
    rank = int((s > rtol * s.max()).sum())
    return u[:, :rank].to(w_out.dtype)


def split(
    v: Float[Tensor, " m"], w_out: Float[Tensor, "m d"]
) -> tuple[Float[Tensor, " m"], Float[Tensor, " m"]]:
    """(proj, null_proj): v's component in the row space of W_out and the rest (v = proj + null)."""
    q = row_space_basis(w_out).double()
    proj = q @ (q.T @ v.double())
    return proj.to(v.dtype), (v.double() - proj).to(v.dtype)


def unit_basis(*vectors: Float[Tensor, " m"]) -> Float[Tensor, "m k"]:
    """Orthonormal basis (columns) of the span of `vectors`; one vector is just normalised."""
    q, r = torch.linalg.qr(torch.stack(vectors, dim=1))
    return q * torch.sign(torch.diagonal(r))  # keep each column pointing along its vector


def projections(acts: Float[Tensor, "n m"], vector: Float[Tensor, " m"]) -> Float[Tensor, " n"]:
    """acts · vector (unnormalised: projections on proj and null_proj add up to those on v)."""
    return acts @ vector


def separation(a: Float[Tensor, " n"], b: Float[Tensor, " k"]) -> float:
    """|mean(a) - mean(b)| / pooled standard deviation (Cohen's d, unsigned)."""
    pooled = ((a.var() * (len(a) - 1) + b.var() * (len(b) - 1)) / (len(a) + len(b) - 2)).sqrt()
    return ((a.mean() - b.mean()).abs() / pooled.clamp_min(1e-12)).item()


def cosine(a: Float[Tensor, " d"], b: Float[Tensor, " d"]) -> float:
    """Cosine similarity of two vectors."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def random_output_cosines(
    w_out: Float[Tensor, "m d"], target: Float[Tensor, " d"], n: int, generator: torch.Generator
) -> Float[Tensor, " n"]:
    """Cosines of r @ W_out with `target` for n random unit hidden directions r (signed)."""
    r = torch.randn(n, w_out.shape[0], generator=generator, dtype=torch.float64)
    r = (r / r.norm(dim=1, keepdim=True)).to(w_out)
    return torch.nn.functional.cosine_similarity(r @ w_out, target[None].to(w_out), dim=1)
