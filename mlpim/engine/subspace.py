"""Subspaces: a trainable orthonormal basis (DAS rotation), saving and loading."""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from mlpim.engine.models import ConfigError
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
    """Save a basis with its metadata (model, fingerprint, site, layer, k, seed, metrics ...)."""
    torch.save({"basis": basis.detach().cpu(), **meta}, path)


def direction_meta(model, model_cfg, kind: str, layer: int, position: str = "end") -> dict:
    """What ties a direction to where it was found: model, weights, processing, site, version."""
    from mlpim import __version__
    from mlpim.engine.models import fingerprint, processing, site_width

    return {"model": model.cfg.model_name, "fingerprint": fingerprint(model),
            "processing": processing(model_cfg), "site": kind, "layer": layer,
            "position": position, "width": int(site_width(model, kind)),
            "mlpim_version": __version__}  # fmt: skip


def _plain(path: Path) -> Tensor | dict:
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    try:  # never runs code from the file
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ConfigError(f"{path} is not a direction file mlpim can read safely: {e}") from e


def load_subspace(path: str | Path, site: str | None = None, layer: int | None = None) -> dict:
    """A saved subspace (`['basis']` is d×k), or a plain tensor file (.pt holding a tensor, or
    .npy; a vector is one direction) with its `site` and `layer` given by the caller."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"direction={path}: no such file")
    saved = _plain(path)
    if torch.is_tensor(saved):
        v = saved.float()
        basis = orthonormalize(v[:, None] if v.dim() == 1 else v)
        return {"basis": basis, "site": site, "layer": layer}
    if not isinstance(saved, dict) or "basis" not in saved:
        raise ConfigError(f"{path} holds neither a tensor nor a saved subspace (no 'basis')")
    return saved


def check_model(saved: dict, model, path: str | Path) -> None:
    """A clear error when a direction was found on other weights than `model`'s."""
    from mlpim.engine.models import fingerprint

    fp = saved.get("fingerprint")
    if fp is not None and fp != fingerprint(model):
        raise ConfigError(
            f"{path} was found on model {saved.get('model')!r} (weights {fp}), not on "
            f"{model.cfg.model_name!r} (weights {fingerprint(model)})"
        )
