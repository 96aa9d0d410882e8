"""Evaluate END-token interventions on IOI pairs: prepare activations once, then patch many ways."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mlpim.engine import fastpath, metrics
from mlpim.engine.models import hook_name, validate_site
from mlpim.engine.patching import Setter, patched_logits
from mlpim.tasks.ioi import PairBatch


@dataclass
class Prepared:
    """One pair batch with its site activations and unpatched END logits."""

    pairs: PairBatch
    base_act: Float[Tensor, "b ..."]
    source_act: Float[Tensor, "b ..."]
    clean_ld: Float[Tensor, b]
    state: fastpath.EndState | None  # for the END-only fast path


def prepare(
    model, batches: list[PairBatch], kind: str, layer: int, fast: bool = True
) -> list[Prepared]:
    """Run base and source once per batch (no gradients) and keep what patching needs."""
    name = validate_site(model, kind, layer)
    if kind == "resid_mid":
        raise ValueError(
            "resid_mid cannot be patched: TransformerBridge's hook_resid_mid only feeds the MLP's input; patch resid_post of layer-1 or attn_out instead"
        )
    names = {name} | (fastpath.state_names(model, kind, layer) if fast else set())
    out = []
    with torch.no_grad():
        for pb in batches:
            logits, base = model.run_with_cache(pb.base.tokens, names_filter=lambda n: n in names)
            _, src = model.run_with_cache(pb.source.tokens, names_filter=[name])
            clean_ld = metrics.logit_diff(logits[:, -1], pb.base.io, pb.base.s)
            state = fastpath.state_from_cache(model, base, kind, layer) if fast else None
            out.append(Prepared(pb, base[name][:, -1], src[name][:, -1], clean_ld, state))
    return out


def patched_end_logits(model, prep: Prepared, setter: Setter, kind: str, layer: int) -> Tensor:
    """END logits of the base prompts with the site patched by `setter`."""
    if prep.state is not None:
        return fastpath.resume(model, prep.state, setter(prep.base_act, prep.source_act))
    name = hook_name(kind, layer)
    return patched_logits(model, prep.pairs.base.tokens, {name: prep.source_act}, {name: setter})


def patched_end_loss(model, prep: Prepared, setter: Setter, kind: str, layer: int) -> Tensor:
    """Mean cross-entropy of the patched END logits against the counterfactual labels."""
    if prep.state is not None:
        act = setter(prep.base_act, prep.source_act)
        return fastpath.resume_loss(model, prep.state, act, prep.pairs.label)
    logits = patched_end_logits(model, prep, setter, kind, layer)
    return torch.nn.functional.cross_entropy(logits, prep.pairs.label)


def evaluate(
    model, prepared: list[Prepared], setter: Setter, kind: str, layer: int
) -> dict[str, float]:
    """Patched LD, FLDD, IIA and flip rate over all prepared batches."""
    lds, clean, hits = [], [], []
    with torch.no_grad():
        for p in prepared:
            logits = patched_end_logits(model, p, setter, kind, layer)
            lds.append(metrics.logit_diff(logits, p.pairs.base.io, p.pairs.base.s))
            clean.append(p.clean_ld)
            hits.append((logits.argmax(-1) == p.pairs.label).float())
    ld, cl = torch.cat(lds), torch.cat(clean)
    return {
        "logit_diff": ld.mean().item(),
        "fldd": metrics.fldd(ld, cl),
        "iia": torch.cat(hits).mean().item(),
        "flip_rate": metrics.flip_rate(ld, cl),
    }


def clean_metrics(prepared: list[Prepared]) -> dict[str, float]:
    """Unpatched LD of the base prompts (FLDD 0 by definition)."""
    ld = torch.cat([p.clean_ld for p in prepared])
    return {"logit_diff": ld.mean().item(), "fldd": 0.0, "flip_rate": 0.0}
