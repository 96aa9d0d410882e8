"""Subspaces: a trainable orthonormal basis (DAS rotation), saving and loading."""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from mlpim.engine.patching import subspace_patch


class RotatedSubspace(nn.Module):
    """A d×k basis with orthonormal columns, kept orthonormal by torch's parametrization."""

    def __init__(self, d: int, k: int, generator: torch.Generator | None = None):
        super().__init__()
        if not 1 <= k <= d:
            raise ValueError(f"subspace dim {k} must be between 1 and the site width {d}")
        self.lin = orthogonal(nn.Linear(k, d, bias=False))
        with torch.no_grad():
            init = torch.linalg.qr(torch.randn(d, k, generator=generator))[0]
            self.lin.weight = init

    @property
    def basis(self) -> Float[Tensor, "d k"]:
        return self.lin.weight

    def forward(self, base: Float[Tensor, "b d"], source: Float[Tensor, "b d"]) -> Tensor:
        return subspace_patch(base, source, self.basis)


def orthonormalize(v: Float[Tensor, "d k"]) -> Float[Tensor, "d k"]:
    """Orthonormal basis of the span of v's columns (a single vector is normalised)."""
    return torch.linalg.qr(v.reshape(v.shape[0], -1))[0]


def save_subspace(path: Path, basis: Tensor, **meta) -> None:
    """Save a basis with its metadata (model, site, layer, k, seed, metrics ...)."""
    torch.save({"basis": basis.detach().cpu(), **meta}, path)


def load_subspace(path: str | Path) -> dict:
    """Load a saved subspace; `['basis']` is d×k."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved subspace at {path}")
    return torch.load(path, weights_only=False)
