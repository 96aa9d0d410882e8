"""Distributed alignment search: train a subspace whose patch yields the counterfactual answer."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mlpim import reuse
from mlpim.engine.interventions import Prepared, evaluate, patched_end_loss, prepared_key
from mlpim.engine.subspace import RotatedSubspace


@dataclass(frozen=True)
class DasSettings:
    """How DAS trains: subspace dimension, Adam's learning rate decayed linearly to
    `lr * lr_end_factor` over `epochs` (`conf/method/das.yaml` documents each)."""

    dim: int = 1
    lr: float = 0.01
    lr_end_factor: float = 0.1
    epochs: int = 30


def fit(
    model,
    train: list[Prepared],
    test: list[Prepared] | None,
    patch: nn.Module,
    method: DasSettings,
    gen: torch.Generator,
    desc: str = "DAS",
    progress: bool = True,
) -> pd.DataFrame:
    """Train `patch`'s parameters: Adam + LinearLR, full-vocabulary cross-entropy at END.

    Batches are shuffled with `gen` every epoch; with `test`, the test IIA is logged per epoch.
    Returns the history (epoch, train_loss[, test_iia]).
    """
    opt = torch.optim.Adam(patch.parameters(), lr=method.lr)
    sched = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1.0, end_factor=method.lr_end_factor, total_iters=method.epochs
    )
    rows = []
    for epoch in (bar := tqdm(range(method.epochs), desc=desc, disable=not progress)):
        total, n = 0.0, 0
        for i in torch.randperm(len(train), generator=gen).tolist():
            p = train[i]
            loss = patched_end_loss(model, p, patch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(p.pairs), n + len(p.pairs)
        sched.step()
        rows.append({"epoch": epoch, "train_loss": total / n})
        if test:
            rows[-1]["test_iia"] = evaluate(model, test, patch)["iia"]
        bar.set_postfix({k: f"{v:.3f}" for k, v in rows[-1].items() if k != "epoch"})
    return pd.DataFrame(rows)


def train_das(
    model,
    train: list[Prepared],
    test: list[Prepared] | None,
    method: DasSettings,
    seed: int,
    progress: bool = True,
) -> tuple[RotatedSubspace, pd.DataFrame]:
    """DAS from a seeded random orthonormal basis; returns the trained basis and its history."""
    key = lambda: (prepared_key(model, train), prepared_key(model, test or None), method, seed)  # noqa: E731

    def compute() -> tuple[RotatedSubspace, pd.DataFrame]:
        torch.manual_seed(seed)  # the orthogonal parametrization draws from the global generator
        gen = torch.Generator().manual_seed(seed)
        d = train[0].base_act.shape[-1]
        rot = RotatedSubspace(d, method.dim, generator=gen).to(train[0].base_act.device)
        desc = f"DAS {train[0].name} k={method.dim}"
        return rot, fit(model, train, test, rot, method, gen, desc, progress)

    return reuse.replay("das", key, compute)
