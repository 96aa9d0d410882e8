"""What an MLP writes into the residual stream, read off the model.

Most blocks add the MLP's output h @ W_out (+ b_out) to the residual as it is. Some normalise it
first: Gemma 2 and 3 apply a post-feedforward RMSNorm, whose gain reaches ~3·10³ at Gemma 3
270M's layer 10. There, moving the hidden activation along v moves the residual along M (v @ W_out),
M the Jacobian of that norm at the MLP's output, not along v @ W_out. `residual_w_out` gives W_out
as the residual sees it: W_out itself, or W_out Mᵀ with M the norm's Jacobian averaged over the
MLP's outputs on real prompts, after checking on those prompts that the MLP module's output is
its hidden activation times W_out (+ b_out), the W_out mlpim reads (`check_hidden_writes`), and
that what the block adds is that output, or the block's own norm of it (anything else is refused
in one line, naming the layer).
The W_out-nullspace is the same either way: a hidden change W_out does not read changes nothing.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.analysis.nullspace import mlp_b_out, mlp_output, mlp_w_out
from mlpim.engine.family import post_mlp_norm
from mlpim.engine.models import hook_name
from mlpim.engine.patching import at, run_cache
from mlpim.errors import MlpimError

MODULE_OUT = "blocks.{layer}.mlp.hook_out"  # the MLP module's own output: h @ W_out (+ b_out)
BLOCK_OUT = "blocks.{layer}.hook_mlp_out"  # what the block adds to the residual
REL_TOL = 1e-4  # of the output's largest entry: how far hidden @ W_out (+ b_out) may be from it


def end_outputs(
    model, layer: int, batches: list
) -> tuple[Float[Tensor, "n m"], Float[Tensor, "n d"], Float[Tensor, "n d"]]:
    """(the MLP's hidden activation, its module's output, what the block adds to the residual)
    at each prompt's END."""
    names = [hook_name("mlp_post", layer), MODULE_OUT.format(layer=layer)]
    names.append(BLOCK_OUT.format(layer=layer))
    out: list[list[Tensor]] = [[], [], []]
    for b in batches:
        _, cache = run_cache(model, b, names)
        for got, name in zip(out, names, strict=True):
            got.append(at(cache[name], b.pos))
    hidden, pre, post = (torch.cat(t) for t in out)
    return hidden, pre, post


def check_hidden_writes(model, layer: int, hidden: Tensor, pre: Tensor) -> float:
    """Max |hidden @ W_out (+ b_out) − the MLP module's output| (float64); one MlpimError line,
    naming the layer and the error, when it exceeds REL_TOL of the output's largest entry (4 eps
    of a 16-bit dtype): every MLP check reads the hidden activation through this W_out."""
    w, b = mlp_w_out(model, layer), mlp_b_out(model, layer)
    written = mlp_output(hidden.double(), w.double(), None if b is None else b.double())
    err = (written - pre.double()).abs().max().item()
    scale = max(pre.abs().max().item(), torch.finfo(pre.dtype).tiny)
    tol = max(REL_TOL, 4 * torch.finfo(pre.dtype).eps) * scale
    if not err <= tol:
        raise MlpimError(
            f"block {layer}: the MLP's hidden activation @ W_out (+ b_out) differs from its "
            f"output by up to {err:.3g} (tolerance {tol:.3g}); mlpim cannot read what a hidden "
            "direction writes in this model family"
        )
    return err


def residual_jacobian(model, layer: int, batches: list) -> Float[Tensor, "d d"] | None:
    """The Jacobian of what block `layer` adds to the residual with respect to its MLP's output,
    averaged over `batches`' patched positions (float64); None where the block adds that output
    as it is. Checks first that the MLP writes hidden @ W_out (+ b_out) and that the block adds
    that output or its own norm of it (one MlpimError line otherwise)."""
    hidden, pre, post = end_outputs(model, layer, batches)
    check_hidden_writes(model, layer, hidden, pre)
    tol = 1e-4 * max(post.abs().max().item(), 1.0)
    if (pre - post).abs().max().item() <= tol:
        return None
    norm = post_mlp_norm(model, layer)
    with torch.no_grad():
        normed = norm(pre) if norm is not None else None
    if normed is None or (normed - post).abs().max().item() > tol:
        raise MlpimError(
            f"block {layer} adds to the residual something other than its MLP's output or its own "
            "norm of it; mlpim cannot say what a hidden direction writes there"
        )
    mean_norm = lambda e: norm(pre + e).mean(0)  # noqa: E731
    jac = torch.autograd.functional.jacobian(mean_norm, torch.zeros_like(pre[0]), vectorize=True)
    return jac.double()


def residual_w_out(model, layer: int, batches: list) -> Float[Tensor, "m d"]:
    """W_out as the residual stream sees it, measured on `batches` (see the module docstring)."""
    w = mlp_w_out(model, layer)
    jac = residual_jacobian(model, layer, batches)
    return w if jac is None else (w.double() @ jac.T).to(w.dtype)
