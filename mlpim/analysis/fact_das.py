"""Factual recall: the fact pairs with their metadata, per-pair DAS directions trained in one
batched run, per-pair outcomes of an intervention, and the W_out row/null parts of directions.

The per-pair protocol (the paper's): one 1-D direction per fact pair, trained and measured on that
pair. `PairDirections` holds all pairs' directions as one [n, d] matrix; row i patches pair i
only. The loss is the SUM of the per-pair losses and each Adam step sees every pair once, so each
direction's update equals that of training its pair alone (Adam is elementwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from mlpim.analysis import nullspace as ns
from mlpim.engine import metrics
from mlpim.engine.interventions import Prepared, patched_end_logits, patched_end_loss
from mlpim.engine.models import ConfigError
from mlpim.engine.patching import Setter, work_dtype
from mlpim.files import save_torch
from mlpim.tasks.pairs import Pair

MIN_PART_NORM = 1e-2  # row/null parts shorter than this (of a unit direction) are skipped
KIND = "mlp_post"


def check_cfg(cfg) -> None:
    """fact_patching / fact_editing need dataset=facts, site=mlp_post and 1-D DAS."""
    if cfg.dataset.name != "facts":
        raise ConfigError(f"{cfg.experiment} needs dataset=facts, got {cfg.dataset.name}")
    if cfg.site.kind != KIND:
        raise ConfigError(f"{cfg.experiment} patches mlp_post, not {cfg.site.kind}")
    if cfg.method.name != "das" or cfg.method.dim != 1:
        raise ConfigError(f"{cfg.experiment} needs method=das method.dim=1")
    run = cfg.extra.pair_run
    if run and not pair_file(run, 0).parent.is_dir():
        raise ConfigError(f"extra.pair_run={run}: no such directory (a fact_patching run)")


def layer_grid(layers, step: int, n_layers: int) -> list[int]:
    """`layers` when given, else every `step`-th layer from 0; checked against the model."""
    grid = (
        sorted({int(x) for x in layers}) if layers is not None else list(range(0, n_layers, step))
    )
    if not grid or not 0 <= grid[0] <= grid[-1] < n_layers:
        raise ConfigError(f"extra.layers={grid} must lie within 0..{n_layers - 1}")
    return grid


class PairDirections(nn.Module):
    """n independent directions (rows of `raw`, used normalised); row i patches pair i.

    `select(start, stop)` names the rows of the batch about to be patched."""

    def __init__(self, init: Float[Tensor, "n d"]):
        super().__init__()
        self.raw = nn.Parameter(init.detach().clone())
        self.rows = slice(0, init.shape[0])

    @property
    def directions(self) -> Float[Tensor, "n d"]:
        return self.raw / self.raw.norm(dim=1, keepdim=True)

    def select(self, start: int, stop: int) -> PairDirections:
        self.rows = slice(start, stop)
        return self

    def forward(self, base: Float[Tensor, "b d"], source: Float[Tensor, "b d"]) -> Tensor:
        raw = self.raw[self.rows]
        v = raw / raw.norm(dim=1, keepdim=True)
        return base + ((source - base) * v).sum(-1, keepdim=True) * v


def random_directions(n: int, d: int, seed: int) -> Float[Tensor, "n d"]:
    """n seeded random unit directions (the per-pair initialisation)."""
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=1, keepdim=True)


def offsets(prepared: list[Prepared]) -> list[tuple[int, int]]:
    """(start, stop) of each batch's pairs in the concatenation of all batches."""
    out, start = [], 0
    for p in prepared:
        out.append((start, start + len(p.pairs)))
        start += len(p.pairs)
    return out


def train_pair_directions(
    model, prepared: list[Prepared], init: Float[Tensor, "n d"], steps: int, lr: float,
    lr_end_factor: float = 0.1,
) -> tuple[Float[Tensor, "n d"], list[float]]:  # fmt: skip
    """One direction per pair, all pairs at once; returns unit directions and the summed loss
    per step. Every step accumulates the summed cross-entropy over all batches, then one Adam
    step (LinearLR to lr·lr_end_factor), then renormalises each row (as the paper)."""
    act = prepared[0].base_act
    dirs = PairDirections(init.to(act.device, work_dtype(act)))
    opt = torch.optim.Adam([dirs.raw], lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, lr_end_factor, total_iters=steps)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for (a, b), p in zip(offsets(prepared), prepared, strict=True):
            loss = patched_end_loss(model, p, dirs.select(a, b)) * (b - a)  # mean -> sum
            loss.backward()
            total += loss.item()
        opt.step()
        sched.step()
        with torch.no_grad():
            dirs.raw /= dirs.raw.norm(dim=1, keepdim=True)
        losses.append(total)
    return dirs.directions.detach(), losses


@dataclass
class Outcomes:
    """Per pair: patched LD (base minus source attribute), clean LD, argmax == source attribute."""

    ld: Float[Tensor, " n"]
    clean: Float[Tensor, " n"]
    hit: Bool[Tensor, " n"]


def outcomes(model, prepared: list[Prepared], setter_for: Callable[[int, int], Setter]) -> Outcomes:
    """Per-pair outcomes of patching each batch with `setter_for(start, stop)` of its pairs."""
    lds, clean, hits = [], [], []
    with torch.no_grad():
        for (a, b), p in zip(offsets(prepared), prepared, strict=True):
            logits = patched_end_logits(model, p, setter_for(a, b))
            base = p.pairs.base
            lds.append(metrics.logit_diff(logits, base.answer, base.other))
            clean.append(p.clean_ld)
            hits.append(logits.argmax(-1) == p.pairs.label)
    return Outcomes(torch.cat(lds), torch.cat(clean), torch.cat(hits))


def fact_metrics(o: Outcomes, keep: Bool[Tensor, " n"] | None = None) -> dict[str, float]:
    """fact_flip (argmax = source attribute), FLDD, mean patched LD, ld_flip (LD changes sign)
    and n_pairs, over the pairs in `keep` (all by default); empty -> {}."""
    if keep is not None:
        o = Outcomes(o.ld[keep], o.clean[keep], o.hit[keep])
    if len(o.ld) == 0:
        return {}
    return {"fact_flip": o.hit.float().mean().item(), "fldd": metrics.fldd(o.ld, o.clean),
            "logit_diff": o.ld.mean().item(), "ld_flip": metrics.flip_rate(o.ld, o.clean),
            "n_pairs": float(len(o.ld))}  # fmt: skip


def direction_parts(
    v: Float[Tensor, "n m"], w_out: Float[Tensor, "m d"]
) -> dict[str, tuple[Float[Tensor, "n m"], Float[Tensor, " n"]]]:
    """{"row": (unit row-space parts, norms), "null": (unit nullspace parts, norms)} of each
    unit direction (row of v); a part shorter than MIN_PART_NORM is replaced by v's row (its
    norm tells to skip it)."""
    q = ns.row_space_basis(w_out).double()
    row = (v.double() @ q) @ q.T
    out = {}
    for name, part in (("row", row), ("null", v.double() - row)):
        norm = part.norm(dim=1)
        unit = torch.where((norm >= MIN_PART_NORM)[:, None], part / norm.clamp_min(1e-12)[:, None],
                           v.double())  # fmt: skip
        out[name] = (unit.to(v.dtype), norm.to(v.dtype))
    return out


def pair_directions(cfg, model, prepared: list[Prepared], layer: int):
    """The per-pair directions of `prepared`'s pairs at `layer` as both experiments train them:
    seeded init (seed + layer), `extra.pair_steps` Adam steps at `method.lr`.
    Returns (unit directions [n, d], summed loss per step)."""
    n, d = sum(len(p.pairs) for p in prepared), prepared[0].base_act.shape[-1]
    init = random_directions(n, d, cfg.seed + layer)
    return train_pair_directions(model, prepared, init, cfg.extra.pair_steps, cfg.method.lr,
                                 cfg.method.lr_end_factor)  # fmt: skip


def pair_file(run_dir, layer: int):
    """Where `fact_patching` saves the per-pair directions of one layer."""
    from pathlib import Path

    return Path(run_dir) / f"pair_directions_L{layer}.pt"


def save_pair_directions(run_dir, layer: int, v: Tensor, pairs: list[Pair], model) -> None:
    """Save one layer's per-pair directions with the pairs and the weights they belong to."""
    from mlpim.engine.models import fingerprint

    keys = [(p.base, p.source) for p in pairs]
    record = {"layer": layer, "directions": v.detach().cpu(), "pairs": keys,
              "fingerprint": fingerprint(model)}  # fmt: skip
    save_torch(record, pair_file(run_dir, layer))


def load_pair_directions(run_dir, layer: int, pairs: list[Pair], model) -> Tensor:
    """Per-pair directions saved by a `fact_patching` run, checked against these pairs/weights."""
    from mlpim.engine.models import fingerprint

    path = pair_file(run_dir, layer)
    if not path.is_file():
        have = sorted(p.name for p in path.parent.glob("pair_directions_L*.pt"))
        raise ConfigError(f"extra.pair_run={run_dir}: no {path.name} (it has {have or 'none'})")
    saved = torch.load(path, weights_only=True, map_location="cpu")
    if saved["fingerprint"] != fingerprint(model):
        raise ConfigError(f"{path} was trained on other weights than {model.cfg.model_name!r}")
    if [tuple(k) for k in saved["pairs"]] != [(p.base, p.source) for p in pairs]:
        raise ConfigError(f"{path} holds directions of other fact pairs (dataset settings differ)")
    return saved["directions"].to(model.cfg.device)
