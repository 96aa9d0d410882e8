"""Distributed alignment search: train a subspace whose patch yields the counterfactual answer.

`fit` trains one patch; `fit_many` trains several at once on the same batches in the same
order, one resume of the model per step for all of them (`patched_end_losses`). Either stops a
run early once its epoch loss has converged, where `DasSettings.stop_tol` asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mlpim import reuse
from mlpim.engine.interventions import (
    Prepared,
    evaluate,
    patched_end_loss,
    patched_end_losses,
    prepared_key,
)
from mlpim.engine.subspace import RotatedSubspace


@dataclass(frozen=True)
class DasSettings:
    """How DAS trains: subspace dimension, Adam's learning rate decayed linearly to
    `lr * lr_end_factor` over `epochs`, and when a run stops early: once its epoch loss improves
    by less than `stop_tol` (relative) `stop_patience` epochs in a row; 0 trains every epoch
    (`conf/method/das.yaml` documents each)."""

    dim: int = 1
    lr: float = 0.01
    lr_end_factor: float = 0.1
    epochs: int = 30
    stop_tol: float = 0.0
    stop_patience: int = 3


def converged(losses: list[float], method: DasSettings) -> bool:
    """Whether the last `stop_patience` epochs each improved the loss by less than `stop_tol`
    of the epoch before (a rise counts as no improvement); never with `stop_tol` 0."""
    k = method.stop_patience
    if method.stop_tol <= 0 or len(losses) <= k:
        return False
    last = losses[-k - 1 :]
    gains = [(a - b) / max(abs(a), 1e-12) for a, b in zip(last, last[1:], strict=False)]
    return all(g < method.stop_tol for g in gains)


def _optimiser(patch: nn.Module, method: DasSettings) -> tuple:
    opt = torch.optim.Adam(patch.parameters(), lr=method.lr)
    sched = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1.0, end_factor=method.lr_end_factor, total_iters=method.epochs
    )
    return opt, sched


def _stop_rows(rows: list[dict], method: DasSettings) -> bool:
    """Mark the epoch just logged with whether the run stops there (only where runs may stop)."""
    stop = converged([r["train_loss"] for r in rows], method)
    if method.stop_tol > 0:
        rows[-1]["converged"] = stop
    return stop


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
    Returns the history (epoch, train_loss[, test_iia][, converged: where runs may stop early,
    True at the epoch the run stopped]).
    """
    opt, sched = _optimiser(patch, method)
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
        if _stop_rows(rows, method):
            break
    return pd.DataFrame(rows)


def fit_many(
    model,
    train: list[Prepared],
    patches: list[nn.Module],
    method: DasSettings,
    gen: torch.Generator,
    desc: str = "DAS",
    progress: bool = True,
) -> list[pd.DataFrame]:
    """`fit` (without test pairs) of several patches at once, on the same batches in the same
    order (shuffled with `gen`): each step resumes the model once over every pair repeated for
    each patch still training, and the sum of their losses gives each patch the gradient of its
    own. Each patch has its own Adam and schedule and stops on its own. Equal to `fit` of each
    patch with a generator in `gen`'s state, up to float rounding (tests/test_das_many.py)."""
    optims = [_optimiser(p, method) for p in patches]
    rows: list[list[dict]] = [[] for _ in patches]
    active = list(range(len(patches)))
    bar = tqdm(range(method.epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        totals, n = [0.0] * len(active), 0
        for i in torch.randperm(len(train), generator=gen).tolist():
            p = train[i]
            losses = patched_end_losses(model, p, [patches[j] for j in active])
            for j in active:
                optims[j][0].zero_grad()
            losses.sum().backward()
            for j in active:
                optims[j][0].step()
            for k, value in enumerate(losses.tolist()):
                totals[k] += value * len(p.pairs)
            n += len(p.pairs)
        for j, total in zip(active, totals, strict=True):
            optims[j][1].step()
            rows[j].append({"epoch": epoch, "train_loss": total / n})
        active = [j for j in active if not _stop_rows(rows[j], method)]
        bar.set_postfix({"training": len(active)})
        if not active:
            break
    return [pd.DataFrame(r) for r in rows]


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
