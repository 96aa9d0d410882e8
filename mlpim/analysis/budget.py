"""ioi_neuron_budget's measurement: DAS in an MLP restricted to n of its neurons.

The basis is zero outside the chosen neurons: an orthonormal n×k `RotatedSubspace` embedded into
d_mlp, so `evaluate` and the END-only fast path apply unchanged. FLDD and IIA (test) vs n, with a
least-squares line FLDD = slope·n + intercept (the paper finds FLDD linear in n for GPT-2 MLP8).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mlpim.analysis.rows import metric_rows
from mlpim.engine.das import DasSettings, fit
from mlpim.engine.interventions import Prepared, evaluate
from mlpim.engine.patching import subspace_patch
from mlpim.engine.subspace import RotatedSubspace
from mlpim.errors import ConfigError

log = logging.getLogger(__name__)


class NeuronSubspace(nn.Module):
    """A d×k orthonormal basis that is zero outside `neurons` (a width-n rotation embedded in d)."""

    def __init__(self, d: int, neurons: Int[Tensor, n], k: int, generator=None):
        super().__init__()
        self.d = d
        self.register_buffer("neurons", neurons.long())
        self.inner = RotatedSubspace(len(neurons), k, generator=generator)

    @property
    def basis(self) -> Float[Tensor, "d k"]:
        """The d×k basis: the inner rotation placed at `neurons`, zero elsewhere."""
        inner = self.inner.basis
        return inner.new_zeros(self.d, inner.shape[1]).index_copy(0, self.neurons, inner)

    def forward(self, base: Float[Tensor, "b d"], source: Float[Tensor, "b d"]) -> Tensor:
        """The base activation with its component in the basis taken from the source."""
        return subspace_patch(base, source, self.basis)


def neuron_order(d: int, subset: str, gen: torch.Generator) -> Int[Tensor, d]:
    """Neuron order whose first n entries are the n-subset: `first` (0..d-1) or `random`."""
    if subset == "first":
        return torch.arange(d)
    if subset == "random":
        return torch.randperm(d, generator=gen)
    raise ConfigError(f"unknown extra.subset {subset!r}; allowed: first, random")


def grid(values, d: int) -> list[int]:
    """`extra.n_grid` as sorted neuron counts ≤ d; `all` (or any value ≥ d) means d."""
    ns = {d if str(v) == "all" else min(int(v), d) for v in values}
    if min(ns) < 1:
        raise ConfigError(f"extra.n_grid={list(values)} holds a count below 1")
    return sorted(ns)


def budget_rows(
    model,
    splits: dict[str, list[Prepared]],
    kind: str,
    layer: int,
    ns: list[int],
    order: Int[Tensor, " d"],
    method: DasSettings,
    seed: int,
) -> list[dict]:
    """Train one restricted DAS per n; FLDD/IIA rows on train and test, and the final loss."""
    rows, d = [], splits["train"][0].base_act.shape[-1]
    for n in ns:
        start = time.time()
        torch.manual_seed(seed)  # the orthogonal parametrization draws from the global one
        gen = torch.Generator().manual_seed(seed)
        module = NeuronSubspace(d, order[:n], method.dim, gen).to(model.cfg.device)
        train_gen = torch.Generator().manual_seed(seed)
        history = fit(model, splits["train"], None, module, method, train_gen, f"DAS {n} neurons")
        losses = history["train_loss"].tolist()
        keys = {"intervention": f"das_n{n}", "site": kind, "layer": layer, "n_neurons": n}
        for split, prepared in splits.items():
            values = evaluate(model, prepared, module)
            rows += metric_rows(values, split=split, **keys)
        rows += metric_rows({"final_loss": losses[-1]} if losses else {}, split="train", **keys)
        log.info(
            "n=%d: %.1f s; test FLDD %.3f, IIA %.3f",
            n,
            time.time() - start,
            values["fldd"],
            values["iia"],
        )
    return rows


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least-squares line y = slope·x + intercept and its R²."""
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = ((y - y.mean()) ** 2).sum()
    return {
        "slope": slope,
        "intercept": intercept,
        "r2_fit": 1 - (resid**2).sum() / ss if ss else 1.0,
    }


def das_test(df: pd.DataFrame, metric: str) -> pd.Series:
    """Test `metric` of the restricted DAS runs indexed by n."""
    sel = df[df.intervention.str.startswith("das_n") & (df.split == "test") & (df.metric == metric)]
    return sel.set_index("n_neurons").value.sort_index()


def fit_rows(df: pd.DataFrame, kind: str, layer: int) -> list[dict]:
    """Rows of the linear fit of test FLDD vs n."""
    fldd = das_test(df, "fldd")
    if len(fldd) < 2:
        return []
    fit = linear_fit(fldd.index.to_numpy(float), fldd.to_numpy(float))
    return metric_rows(fit, intervention="fldd_vs_n_fit", site=kind, layer=layer, split="test")
