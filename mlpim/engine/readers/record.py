"""A direction read from another tool's file, and the check that it fits a model.

`ForeignDirection` is what every reader returns: an orthonormal basis (d×k), the mlpim site
and layer it belongs to (None when the file does not say), where the tool itself put it, and
what the reader had to decide. `check_fits` refuses, in one line, a direction whose site,
layer, width or space does not match a model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.engine.family import family_of
from mlpim.engine.models import SITE_HOOKS
from mlpim.errors import MlpimError

log = logging.getLogger(__name__)

SITES = tuple(SITE_HOOKS)
# Sites that write to (or are) the residual stream: TransformerLens's centring of writing
# weights (mlpim's model.compat=true) shifts them, so a direction found on raw activations
# means something else there. mlp_post and z are computed after a norm and are not shifted.
WRITING_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
ORTHONORMAL_TOL = 1e-4  # |VᵀV - I| allowed for a basis a tool saved as orthonormal
MIN_NORM = 1e-6  # a direction (column) shorter than this points nowhere
RANK_TOL = 1e-4  # a k-D basis whose unit columns have a singular value below this is degenerate

# Conditions a direction may need from the model, with the one-line reason when it is not met.
REQUIREMENTS = {
    "ungated_mlp": "pyvene's mlp_activation on a gated MLP is act_fn's output before the `up` "
    "product, not mlpim's mlp_post (act(gate) * up)",
    "no_post_norm": "the module output pyvene hooks comes before this model's post-attention/"
    "post-MLP norm, while mlpim's {site} comes after it",
    "raw_activations": "it was found on the model's raw activations, but model.compat=true "
    "centres the residual stream that mlpim's {site} reads; run with model.compat=false",
    "centred_activations": "it was found with TransformerLens's centred writing weights "
    "(center_writing_weights), which shift the residual stream that mlpim's {site} reads; run "
    "with model.compat=true",
    "stated_processing": "its config does not say whether the residual stream was centred "
    "(metadata.model_from_pretrained_kwargs.center_writing_weights), which changes what mlpim's "
    "{site} reads; add it to cfg.json if you know it",
}


Z_REFUSAL = (
    "a direction over all heads' z (n_heads·d_head wide) cannot be checked: mlpim patches z "
    "per head ([heads, d_head] at hook_z), so there is no one vector of that width to patch"
)


@dataclass(frozen=True)
class ForeignDirection:
    """A direction (or k-dim subspace) saved by another tool, read without running its code.

    `origin` names the place in the tool's own words ("block_output L8", a hook name, a key);
    `requires` lists conditions on the model from REQUIREMENTS that `check_fits` enforces.
    """

    basis: Float[Tensor, "d k"]
    site: str | None
    layer: int | None
    fmt: str
    kind: str
    origin: str | None = None
    note: str = ""
    path: str = ""
    requires: frozenset[str] = frozenset()

    @property
    def width(self) -> int:
        """Width d of the site the basis lives in."""
        return int(self.basis.shape[0])

    @property
    def k(self) -> int:
        """Dimension of the subspace (1 for a single direction)."""
        return int(self.basis.shape[1])

    def describe(self) -> str:
        """One line: tool, what, where the tool put it → mlpim site, width and k."""
        where = f"{self.site} L{self.layer}" if self.site is not None else "site not given"
        if self.site is not None and self.layer is None:
            where = f"{self.site}, layer not given"
        at = f" at {self.origin}" if self.origin else ""
        return f"{self.fmt} {self.kind}{at} → {where}, width {self.width}, k={self.k}"


@dataclass(frozen=True)
class ModelSizes:
    """The facts about a model that decide whether a direction fits it."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    d_head: int
    gated_mlp: bool
    post_norm: bool  # blocks normalise the attention/MLP output before adding it (Gemma, OLMo 2)
    name: str = "the model"

    def width(self, site: str) -> int:
        """Width of a site's activation at one position (z flattened head-major)."""
        if site == "mlp_post":
            return self.d_mlp
        return self.n_heads * self.d_head if site == "z" else self.d_model


def sizes_of(model) -> ModelSizes:
    """ModelSizes of a TransformerLens model or bridge (MLP gating and post-norms: its family)."""
    cfg, family = model.cfg, family_of(model)
    return ModelSizes(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        d_mlp=cfg.d_mlp,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        gated_mlp=family.gated_mlp,
        post_norm=family.post_attn or family.post_mlp,
        name=str(cfg.model_name),
    )


def _unmet(rec: ForeignDirection, sizes: ModelSizes, compat: bool) -> str | None:
    """The first requirement of `rec` the model does not meet (None if all are met)."""
    broken = {
        "ungated_mlp": sizes.gated_mlp,
        "no_post_norm": sizes.post_norm and rec.site in ("attn_out", "mlp_out"),
        "raw_activations": compat and rec.site in WRITING_SITES,
        "centred_activations": not compat and rec.site in WRITING_SITES,
        "stated_processing": rec.site in WRITING_SITES,
    }
    for name in sorted(rec.requires):
        if broken.get(name, False):
            return REQUIREMENTS[name].format(site=rec.site)
    return None


def check_fits(rec: ForeignDirection, sizes: ModelSizes, compat: bool = False) -> None:
    """Raise a one-line MlpimError unless `rec`'s site, layer, width and space fit the model."""
    what = f"{rec.path or rec.fmt} ({rec.describe()})"
    if rec.site is None or rec.layer is None:
        raise MlpimError(
            f"{what}: the file does not say its site and layer; give both: "
            "direction_site=KIND direction_layer=N"
        )
    if rec.site not in SITES:
        raise MlpimError(f"{what}: unknown site {rec.site!r}; mlpim sites: {', '.join(SITES)}")
    if rec.site == "z":
        raise MlpimError(f"{what}: {Z_REFUSAL}")
    last = sizes.n_layers - 1
    if not 0 <= rec.layer <= last:
        raise MlpimError(f"{what}: layer {rec.layer} is outside {sizes.name} (layers 0..{last})")
    want = sizes.width(rec.site)
    if rec.width != want:
        raise MlpimError(f"{what}: width {rec.width}, but {rec.site} of {sizes.name} is {want}")
    if (reason := _unmet(rec, sizes, compat)) is not None:
        raise MlpimError(f"{what}: does not fit {sizes.name}: {reason}")


def basis_problem(v: Tensor) -> str | None:
    """Why `v` (a vector, or a d×k basis in its columns) is no direction; None when it is one:
    finite, no column of (near) zero norm, columns linearly independent."""
    if v.dim() not in (1, 2) or v.numel() == 0:
        return f"a tensor of shape {tuple(v.shape)}; a direction is a vector (d) or a basis (d×k)"
    bad = int((~torch.isfinite(v)).sum())
    if bad:
        return f"{bad} non-finite value(s) (NaN or inf) of {v.numel()}"
    m = v.double().reshape(v.shape[0], -1)
    norms = m.norm(dim=0)
    if (norms < MIN_NORM).any():
        i = int(norms.argmin())
        col = "" if m.shape[1] == 1 else f"column {i} has "
        return f"{col}norm {norms[i].item():.3g} (zero or below {MIN_NORM:g}): it points nowhere"
    s = torch.linalg.svdvals(m / norms)
    if m.shape[1] > 1 and s[-1] < RANK_TOL * s[0]:
        rank = int((s >= RANK_TOL * s[0]).sum())
        return (
            f"a rank-deficient basis: its {m.shape[1]} columns span only {rank} dimension(s) "
            f"(smallest singular value {s[-1].item():.2g} of unit columns)"
        )
    return None


def meaningful(v: Tensor, what: str) -> Tensor:
    """`v` when it is a meaningful direction or basis (`basis_problem`); else one-line error."""
    problem = basis_problem(v)
    if problem is not None:
        raise MlpimError(f"{what}: no direction to check: {problem}")
    return v


def span_basis(v: Float[Tensor, "d k"], what: str) -> Float[Tensor, "d k"]:
    """Orthonormal float32 basis of the span of v's columns; refuses what `basis_problem` does."""
    v = v.detach()
    if v.dim() != 2 or v.shape[1] < 1 or v.shape[0] < v.shape[1]:
        raise MlpimError(f"{what}: expected a d×k matrix with k ≤ d, got shape {tuple(v.shape)}")
    v = meaningful(v, what).to(torch.float64)
    q, r = torch.linalg.qr(v)
    diag = r.diagonal().abs()
    if diag.min() <= 1e-6 * max(float(v.norm(dim=0).max()), 1e-30):
        raise MlpimError(f"{what}: its {v.shape[1]} vector(s) are zero or linearly dependent")
    return (q * torch.sign(r.diagonal())).to(torch.float32)


def orthonormal_basis(
    w: Float[Tensor, "d k"], what: str, rotation: bool = False
) -> Float[Tensor, "d k"]:
    """The one orthonormality policy of every format: a basis whose columns are orthonormal
    (within ORTHONORMAL_TOL) is used as saved; one a tool saved as a rotation (`rotation`: a
    causalab rotation_matrix, a pyvene rotation) that is not is refused; any other (a tensor,
    mlpim's own subspace) is replaced by the orthonormal basis of its span, said in one line."""
    w = meaningful(w.detach(), what)
    m = w.reshape(w.shape[0], -1).to(torch.float64)
    err = float((m.T @ m - torch.eye(m.shape[1], dtype=torch.float64)).abs().max())
    if err <= ORTHONORMAL_TOL:
        return w.to(torch.float32)
    if rotation:
        raise MlpimError(f"{what}: columns are not orthonormal (max |VᵀV - I| = {err:.2g})")
    log.info("%s: columns not orthonormal (max |VᵀV - I| = %.2g): orthonormalised", what, err)
    return span_basis(w, what)


def pick(items: list[int] | tuple[int, ...] | int | None, n: int, what: str) -> list[int] | None:
    """`items` as a list of distinct indices in 0..n-1 (None stays None); one-line error else."""
    if items is None:
        return None
    chosen = list(items) if isinstance(items, list | tuple) else [items]
    bad = [i for i in chosen if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
    if not chosen or bad or len(set(chosen)) != len(chosen):
        raise MlpimError(f"{what}: {items!r} must be distinct indices in 0..{n - 1}")
    return chosen


def agree(found, given, name: str, what: str):
    """The value the file says, after checking a value the user also gave agrees with it."""
    if given is not None and found is not None and given != found:
        raise MlpimError(
            f"{what}: the file says {name}={found!r}, not {given!r} (given as direction_{name}=)"
        )
    return found if found is not None else given


def one_line(e: Exception) -> str:
    """An exception's message on one line; torch's weights_only refusal, said plainly."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return f"it holds Python objects{what} that mlpim does not unpickle (that could run code)"
    return text.splitlines()[0] if text else type(e).__name__
