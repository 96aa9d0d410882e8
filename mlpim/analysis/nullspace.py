"""The nullspace split of an MLP direction, and how its output aligns with a residual direction.

An MLP maps its hidden activations h (width m = d_mlp) to its output h @ W_out (+ b_out), with
W_out of shape [m, d_model]. The *row space* of W_out (the paper's term, for W_out as the map
hidden -> residual) is the span of the hidden directions W_out reads, i.e. the column span of the
[m, d] matrix here; its orthogonal complement, the nullspace, is every n with n @ W_out = 0.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.errors import MlpimError


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


def written(v: Float[Tensor, "... m"], w_out: Float[Tensor, "m d"]) -> Float[Tensor, "... d"]:
    """v @ W_out in float64 (what the MLP writes for hidden direction(s) v, bias left out)."""
    return v.double() @ w_out.double().to(v.device)


def centred_rows(w_out: Float[Tensor, "m d"]) -> bool:
    """True when every row of W_out sums to zero up to the rounding of its dtype, as
    TransformerLens's centred writing weights (`model.compat`) do: ‖W 1‖ ≤ ½·√d·eps·‖W‖_F.

    Rounding the centred weights leaves ‖W 1‖ / ‖W‖_F at about 0.07·√d·eps (measured for d = 64
    to 768 in float32 and bfloat16); uncentred weights give about 1 (SmolLM2: 0.95 to 1.04)."""
    w = w_out.double()
    limit = 0.5 * math.sqrt(w.shape[1]) * torch.finfo(w_out.dtype).eps * w.norm()
    return bool(w.sum(1).norm() <= limit)


def row_space_basis(w_out: Float[Tensor, "m d"]) -> Float[Tensor, "m r"]:
    """Orthonormal float64 basis of the hidden directions W_out reads (r = its rank).

    Whatever W_out's dtype, the SVD runs in float64 on the weights as stored (a bfloat16 W_out
    is an exact matrix, of full rank in general), and a singular value counts unless it is below
    max(m, d)·eps(float64) of the largest. Centred writing weights (`centred_rows`) are centred
    again in float64 first, so that the output-mean direction, which they write only through
    rounding, is left out: rank d_model - 1 in every dtype. A rank of 0 is refused.
    """
    w = w_out.double()
    if centred_rows(w_out):
        w = w - w.mean(1, keepdim=True)
    u, s, _ = torch.linalg.svd(w, full_matrices=False)
    rank = int((s > max(w.shape) * torch.finfo(torch.float64).eps * s.max()).sum())
    if rank == 0:
        raise MlpimError(
            f"W_out ({tuple(w_out.shape)}, {w_out.dtype}) has rank 0: it writes nothing, so "
            "there is no row space to split a direction against"
        )
    return u[:, :rank]


def split(
    v: Float[Tensor, "m ..."], w_out: Float[Tensor, "m d"]
) -> tuple[Float[Tensor, "m ..."], Float[Tensor, "m ..."]]:
    """(proj, null_proj): v's component in the row space of W_out and the rest (v = proj + null),
    column by column for a basis, computed in float64 and returned in v's dtype."""
    q = row_space_basis(w_out).to(v.device)
    proj = q @ (q.T @ v.double())
    return proj.to(v.dtype), (v.double() - proj).to(v.dtype)


def unit_basis(*vectors: Float[Tensor, " m"]) -> Float[Tensor, "m k"]:
    """Orthonormal basis (columns) of the span of `vectors`, one vector just normalised: QR in
    float64, returned in the vectors' dtype, at least float32 (16-bit vectors give float32)."""
    stacked = torch.stack(vectors, dim=1)
    q, r = torch.linalg.qr(stacked.double())
    q = q * torch.sign(torch.diagonal(r))  # keep each column pointing along its vector
    return q.to(torch.promote_types(stacked.dtype, torch.float32))


def part_basis(part: Float[Tensor, "m k"]) -> Float[Tensor, "m r"] | None:
    """Orthonormal basis of the span of a basis' part (its row-space or nullspace part, columns);
    r its rank (singular values above 1e-6), None when r = 0. Of full rank it is `unit_basis` of
    the columns (one column: that column normalised); else the top-r left singular vectors."""
    u, s, _ = torch.linalg.svd(part.double(), full_matrices=False)
    r = int((s > 1e-6).sum())
    if r == 0:
        return None
    if r == part.shape[1]:
        return unit_basis(*part.T)
    return u[:, :r].to(torch.promote_types(part.dtype, torch.float32))


def projections(acts: Float[Tensor, "n m"], vector: Float[Tensor, " m"]) -> Float[Tensor, " n"]:
    """acts · vector (unnormalised: projections on proj and null_proj add up to those on v), in
    the wider of the two dtypes (bfloat16 activations, a float32 direction: float32)."""
    dtype = torch.promote_types(acts.dtype, vector.dtype)
    return acts.to(dtype) @ vector.to(dtype)


def separation(a: Float[Tensor, " n"], b: Float[Tensor, " k"]) -> float:
    """|mean(a) - mean(b)| / pooled standard deviation (Cohen's d, unsigned)."""
    pooled = ((a.var() * (len(a) - 1) + b.var() * (len(b) - 1)) / (len(a) + len(b) - 2)).sqrt()
    return ((a.mean() - b.mean()).abs() / pooled.clamp_min(1e-12)).item()


def cosine(a: Float[Tensor, " d"], b: Float[Tensor, " d"]) -> float:
    """Cosine similarity of two vectors."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def subspace_cosine(written: Float[Tensor, "k d"], target: Float[Tensor, " d"]) -> float:
    """The largest |cos| of `target` with a vector in the span of the rows of `written`
    (‖Q^T t‖/‖t‖ for Q an orthonormal basis of that span; one row: |cosine|)."""
    q = part_basis(written.T.double())
    t = target.double().to(written.device)
    return 0.0 if q is None else ((q.double().T @ t).norm() / t.norm()).item()


def random_output_alignments(
    w_out: Float[Tensor, "m d"], target: Float[Tensor, " d"], n: int, k: int, gen: torch.Generator
) -> Float[Tensor, " n"]:
    """`subspace_cosine` of `target` with the outputs of n random k-dim hidden subspaces (their
    k Gaussian spanning vectors @ W_out; float64), drawn in chunks of 64."""
    w, t = w_out.double(), target.double().to(w_out.device)
    out = []
    for c in range(0, n, 64):
        r = torch.randn(min(64, n - c), k, w.shape[0], generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr((r.to(w.device) @ w).transpose(1, 2))
        out.append((q.transpose(1, 2) @ t).norm(dim=1) / t.norm())
    return torch.cat(out)


def random_output_cosines(
    w_out: Float[Tensor, "m d"], target: Float[Tensor, " d"], n: int, generator: torch.Generator
) -> Float[Tensor, " n"]:
    """Cosines of r @ W_out with `target` for n random unit hidden directions r (signed;
    float64 whatever W_out's dtype)."""
    r = torch.randn(n, w_out.shape[0], generator=generator, dtype=torch.float64)
    r = (r / r.norm(dim=1, keepdim=True)).to(w_out.device)
    out = r @ w_out.double()
    return torch.nn.functional.cosine_similarity(out, target[None].to(out), dim=1)
