"""Subspaces: a trainable orthonormal basis (DAS rotation), and saving one with what ties it to
where it was found. `mlpim.engine.direction.load_direction` reads it back (and every other
format mlpim reads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from mlpim import __version__
from mlpim.engine.models import fingerprint, processing, site_width
from mlpim.engine.patching import subspace_patch
from mlpim.files import save_torch


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
        """The d×k orthonormal basis."""
        return self.lin.weight

    def forward(self, base: Float[Tensor, "b d"], source: Float[Tensor, "b d"]) -> Tensor:
        """The base activation with its component in the basis taken from the source."""
        return subspace_patch(base, source, self.basis)


def save_subspace(path: Path, basis: Tensor, **meta) -> None:
    """Save a basis with its metadata (model, fingerprint, site, layer, k, seed, metrics ...),
    atomically (a temporary name, then renamed: never a partial file)."""
    save_torch({"basis": basis.detach().cpu(), **meta}, path)


def direction_meta(model, spec, kind: str, layer: int, position: str = "end") -> dict:
    """What ties a direction to where it was found: model, weights, processing, site, version."""
    return {
        "model": model.cfg.model_name,
        "fingerprint": fingerprint(model),
        "fingerprint_bf16": fingerprint(model, torch.bfloat16),  # a float32 direction checked
        # on the model in bfloat16 (model.dtype=auto on a GPU), or the other way round
        "processing": processing(spec),
        "site": kind,
        "layer": layer,
        "position": position,
        "width": int(site_width(model, kind)),
        "mlpim_version": __version__,
    }
