"""Distributed alignment search: train a subspace whose patch yields the counterfactual answer."""

from __future__ import annotations

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mlpim.interventions import Prepared, evaluate, patched_end_logits
from mlpim.subspace import RotatedSubspace


def train_das(
    model, train: list[Prepared], test: list[Prepared], kind: str, layer: int,
    method: DictConfig, seed: int, progress: bool = True,
) -> tuple[RotatedSubspace, pd.DataFrame]:  # fmt: skip
    """Adam + LinearLR, cross-entropy over the full vocabulary at END; returns basis and history."""
    torch.manual_seed(seed)  # the orthogonal parametrization draws from the global generator
    gen = torch.Generator().manual_seed(seed)
    d = train[0].base_act.shape[-1]
    rot = RotatedSubspace(d, method.dim, generator=gen).to(train[0].base_act.device)
    opt = torch.optim.Adam(rot.parameters(), lr=method.lr)
    sched = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1.0, end_factor=method.lr_end_factor, total_iters=method.epochs
    )
    rows = []
    bar = tqdm(
        range(method.epochs), desc=f"DAS {kind} L{layer} k={method.dim}", disable=not progress
    )
    for epoch in bar:
        total, n = 0.0, 0
        for i in torch.randperm(len(train), generator=gen).tolist():
            p = train[i]
            logits = patched_end_logits(model, p, rot, kind, layer)
            loss = torch.nn.functional.cross_entropy(logits, p.pairs.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(p.pairs), n + len(p.pairs)
        sched.step()
        test_iia = evaluate(model, test, rot, kind, layer)["iia"]
        rows.append({"epoch": epoch, "train_loss": total / n, "test_iia": test_iia})
        bar.set_postfix(loss=f"{total / n:.3f}", test_iia=f"{test_iia:.2f}")
    return rot, pd.DataFrame(rows)
