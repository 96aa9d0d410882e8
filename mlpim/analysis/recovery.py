"""Is the MLP's input linearly recoverable from its hidden activations? (the paper's appendix)

Tokens come from an offline text corpus (Python's `pydoc_data` help texts, or a text file).
`collect` reads resid_mid (the MLP's input residual) and the MLP post-activations at sampled token
positions. Ridge regression predicts resid_mid·v for random unit v from the post-activations;
a logistic classifier detects the sign of ±z·v·‖resid_mid‖ added to resid_mid, with the MLP
activations recomputed — through a hook on `blocks.L.hook_resid_mid` (which feeds exactly the
MLP's input) or, equivalently and much faster, by applying the MLP to the cached resid_mid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import torch
from jaxtyping import Float, Int
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from mlpim.engine.models import hook_name

RIDGE_ALPHAS = np.logspace(-3, 4, 8)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last needed activation is read."""


def corpus_texts(path: str | None = None) -> list[str]:
    """The text file at `path` as one text, else Python's pydoc help topics (sorted by name)."""
    if path:
        return [Path(path).expanduser().read_text()]
    return [topics[k] for k in sorted(topics)]


def corpus_chunks(tokenizer, texts: list[str], chunk_len: int) -> Int[Tensor, "n seq"]:
    """Consecutive `chunk_len`-token pieces of the joined texts, each with the BOS token prepended."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = len(ids) // chunk_len
    if n == 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one chunk of {chunk_len}")
    body = torch.tensor(ids[: n * chunk_len]).view(n, chunk_len)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), body], dim=1)


def sample_positions(
    n_chunks: int, seq: int, n: int, per_chunk: int, gen: torch.Generator
) -> tuple[Int[Tensor, c], Int[Tensor, "c per"]]:
    """Random chunks and `per_chunk` distinct non-BOS positions in each; ≥ n positions in all."""
    per_chunk = min(per_chunk, seq - 1)
    c = -(-n // per_chunk)
    if c > n_chunks:
        raise ValueError(f"{n} positions need {c} chunks of the corpus; it has {n_chunks}")
    chunks = torch.randperm(n_chunks, generator=gen)[:c]
    pos = torch.stack([torch.randperm(seq - 1, generator=gen)[:per_chunk] + 1 for _ in range(c)])
    return chunks, pos.sort(dim=1).values


def _gather(act: Float[Tensor, "b seq d"], pos: Int[Tensor, "b per"]) -> Float[Tensor, "b*per d"]:
    return act[torch.arange(len(pos))[:, None], pos].reshape(-1, act.shape[-1])


@dataclass
class Activations:
    """Per layer, resid_mid and MLP post-activations at the sampled positions (chunk-major)."""

    mid: dict[int, Float[Tensor, "n d"]]
    post: dict[int, Float[Tensor, "n m"]]


def _reader(store: list[Tensor], pos: Int[Tensor, "b per"]):
    """A hook appending the activation at `pos` to `store` (never trusting `hook.name`, which
    may be an alias: resid_mid's hook point is `ln2.hook_in`)."""
    return lambda act, hook=None: store.append(_gather(act, pos).float().cpu())


def _adder(pos: Int[Tensor, "b per"], delta: Float[Tensor, "b per d"]):
    """A hook adding `delta` to the activation at `pos`."""

    def add(act: Float[Tensor, "b seq d"], hook=None) -> Tensor:
        act = act.clone()
        act[torch.arange(len(pos))[:, None], pos] += delta.to(act.dtype)
        return act

    return add


def _run_until(model, tokens: Int[Tensor, "b seq"], hooks: list, stop: str) -> None:
    """Run `tokens` with `hooks`, ending the forward right after hook `stop` (which must be hooked)."""

    def halt(act: Tensor, hook=None) -> None:
        raise _Stop

    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[*hooks, (stop, halt)])
    except _Stop:
        pass


def collect(
    model,
    tokens: Int[Tensor, "c seq"],
    pos: Int[Tensor, "c per"],
    layers: list[int],
    batch_size: int = 16,
) -> Activations:
    """resid_mid and mlp_post of `layers` at positions `pos`; stops after the last layer's MLP."""
    keys = [(k, L) for L in layers for k in ("resid_mid", "mlp_post")]
    got: dict[tuple[str, int], list[Tensor]] = {key: [] for key in keys}
    for i in range(0, len(tokens), batch_size):
        p = pos[i : i + batch_size].to(model.cfg.device)
        hooks = [(hook_name(*key), _reader(got[key], p)) for key in keys]
        _run_until(
            model,
            tokens[i : i + batch_size].to(model.cfg.device),
            hooks,
            hook_name("mlp_post", max(layers)),
        )
    cat = {key: torch.cat(v) for key, v in got.items()}
    return Activations(
        {L: cat["resid_mid", L] for L in layers}, {L: cat["mlp_post", L] for L in layers}
    )


def random_directions(d: int, k: int, gen: torch.Generator) -> Float[Tensor, "d k"]:
    """k independent random unit vectors (Gaussian, normalised) as columns."""
    v = torch.randn(d, k, generator=gen)
    return v / v.norm(dim=0)


def split_indices(
    n: int, n_train: int, n_test: int, gen: torch.Generator
) -> tuple[Int[Tensor, n_train], Int[Tensor, n_test]]:
    """Disjoint random train and test indices into n samples."""
    if n_train < 2 or n_test < 2 or n_train + n_test > n:
        raise ValueError(f"cannot split {n} samples into {n_train} train and {n_test} test")
    perm = torch.randperm(n, generator=gen)
    return perm[:n_train], perm[n_train : n_train + n_test]


def balanced_signs(n: int, train: Int[Tensor, a], test: Int[Tensor, b]) -> Float[Tensor, n]:
    """±1 labels, half +1 and half −1 within train and within test (random since splits are);
    samples in neither are +1 (they are perturbed but never used)."""
    signs = torch.ones(n)
    signs[train[1::2]] = -1
    signs[test[1::2]] = -1
    return signs


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def ridge_r2(
    x: Float[Tensor, "n m"], y: Float[Tensor, "n k"], train: Int[Tensor, a], test: Int[Tensor, b]
) -> Float[np.ndarray, k]:
    """Held-out R² per target column of RidgeCV (standardised features; per target, alpha from a
    log grid by leave-one-out); a 1-D y gives one R²."""
    y = y[:, None] if y.ndim == 1 else y
    reg = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True))
    reg.fit(_np(x[train]), _np(y[train]))
    return r2_score(
        _np(y[test]), reg.predict(_np(x[test])).reshape(len(test), -1), multioutput="raw_values"
    )


def logistic_accuracy(
    x: Float[Tensor, "n m"],
    labels: Float[Tensor, n],
    train: Int[Tensor, a],
    test: Int[Tensor, b],
    c: float = 1e4,
) -> float:
    """Held-out accuracy of a logistic classifier (standardised features, inverse strength c)."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(_np(x[train]), _np(labels[train]) > 0)
    return float(clf.score(_np(x[test]), _np(labels[test]) > 0))


def perturbation(
    mid: Float[Tensor, "n d"],
    v: Float[Tensor, d],
    z: float,
    signs: Float[Tensor, n],
    scale: str = "mean",
) -> Float[Tensor, "n d"]:
    """±z·v·‖resid_mid‖: the mean norm over samples (`mean`, the paper) or each token's (`token`)."""
    norms = mid.norm(dim=-1)
    if scale not in ("mean", "token"):
        raise ValueError(f"unknown norm scale {scale!r}; allowed: mean, token")
    norm = norms.mean() if scale == "mean" else norms[:, None]
    return (signs[:, None] * z * norm) * v


def post_from_mid(model, layer: int, mid: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
    """MLP post-activations of block `layer` for inputs `mid` (resid_mid), via the model's modules."""
    got = []
    blk = model.blocks[layer]
    name = hook_name("mlp_post", layer)
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, lambda a, hook=None: got.append(a))]):
        blk.mlp(blk.ln2(mid.to(model.cfg.device, next(blk.parameters()).dtype)[:, None]))
    return got[0][:, 0].float().cpu()


def post_with_hook(
    model,
    tokens: Int[Tensor, "c seq"],
    pos: Int[Tensor, "c per"],
    layer: int,
    delta: Float[Tensor, "c*per d"],
    batch_size: int = 16,
) -> Float[Tensor, "c*per m"]:
    """MLP post-activations at `pos` when `delta` is added to `blocks.L.hook_resid_mid` there."""
    out, per = [], pos.shape[1]
    for i in range(0, len(tokens), batch_size):
        p = pos[i : i + batch_size].to(model.cfg.device)
        d = delta[i * per : (i + len(p)) * per].to(model.cfg.device).view(len(p), per, -1)
        hooks = [
            (hook_name("resid_mid", layer), _adder(p, d)),
            (hook_name("mlp_post", layer), _reader(out, p)),
        ]
        _run_until(
            model,
            tokens[i : i + batch_size].to(model.cfg.device),
            hooks,
            hook_name("mlp_post", layer),
        )
    return torch.cat(out)
