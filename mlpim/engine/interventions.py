"""Prepare pairs once, then evaluate any intervention on them; the engine and its runtime guard.

Three engines compute the same patched END logits:
- `cache`: the model's own forward resumed from its own KV cache (any architecture);
- `kernel`: the hand-written END-only kernel (`fastpath`, GPT-2/Llama shapes, patch at END);
- `full`: the whole forward with a hook (the reference).
`auto` takes the kernel where it applies and the cache engine elsewhere. Whichever runs, the
guard compares its unpatched logits on the first batch with the model's own and stops the run
before any training when they differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mlpim.engine import cache, fastpath, metrics
from mlpim.engine.models import ConfigError, validate_site
from mlpim.engine.patching import Setter, at, full, head, patched_logits, run_cache, site_acts
from mlpim.tasks.batch import PairBatch

log = logging.getLogger(__name__)
ENGINES = ("auto", "kernel", "cache", "full")


class EngineMismatchError(ConfigError):
    """The engine's unpatched logits differ from the model's own: its numbers would be wrong."""


@dataclass
class Prepared:
    """One pair batch with its site activations and unpatched END logits."""

    pairs: PairBatch
    name: str  # hook name of the site
    engine: str  # kernel | cache | full
    base_act: Float[Tensor, "b ..."]  # at each base prompt's patch position
    source_act: Float[Tensor, "b ..."]  # at each source prompt's patch position
    clean_logits: Float[Tensor, "b vocab"]  # the model's own END logits of the base prompts
    state: fastpath.EndState | cache.CacheState | None

    @property
    def clean_ld(self) -> Float[Tensor, " b"]:
        b = self.pairs.base
        return metrics.logit_diff(self.clean_logits, b.answer, b.other)


def choose_engine(model, engine: str, batches: list[PairBatch], kind: str) -> str:
    """The engine `engine` resolves to for these batches (auto: kernel where it applies)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown method.engine {engine!r}; allowed: {', '.join(ENGINES)}")
    why = fastpath.unsupported(model)
    if why is None and not all(b.base.at_end for b in batches):
        why = "the patch is not at END"
    if why is None and kind not in fastpath.KINDS:
        why = f"site kind {kind!r}"
    if engine == "kernel" and why:
        raise ConfigError(f"method.engine=kernel cannot run here: {why}; use auto or cache")
    if engine == "auto":
        return "cache" if why else "kernel"
    return engine


Site = tuple[str, int]  # (kind, layer)


def prepare_sites(model, pb: PairBatch, sites: list[Site], engine: str) -> dict[Site, Prepared]:
    """One base and one source run (no gradients) for several sites of one batch."""
    names = {s: validate_site(model, *s) for s in sites}
    wanted = set(names.values())
    if engine == "kernel":
        wanted |= set().union(*(fastpath.state_names(model, *s) for s in sites))
    logits, base = run_cache(model, pb.base, wanted)
    source = site_acts(model, pb.source, sorted(set(names.values())))
    shared = cache.cache_state(model, pb.base) if engine == "cache" else None
    out = {}
    for site, name in names.items():
        state = shared
        if engine == "kernel":
            state = fastpath.state_from_cache(model, base, *site, pb.base.mask)
        act = at(base[name], pb.base.pos)
        out[site] = Prepared(pb, name, engine, act, source[name], logits, state)
    return out


def prepare(
    model, batches: list[PairBatch], kind: str, layer: int, engine: str = "auto"
) -> list[Prepared]:
    """Prepare every batch at site (kind, layer), then check the engine (`guard`)."""
    validate_site(model, kind, layer)
    if kind == "resid_mid":
        raise ConfigError(
            "resid_mid cannot be patched: TransformerBridge's hook_resid_mid only feeds the MLP's input; patch resid_post of layer-1 or attn_out instead"
        )
    chosen = choose_engine(model, engine, batches, kind)
    bar = tqdm(batches, desc=f"prepare {kind} L{layer} ({chosen})", leave=False,
               disable=len(batches) < 4)  # fmt: skip
    prepared = [prepare_sites(model, pb, [(kind, layer)], chosen)[(kind, layer)] for pb in bar]
    if prepared:
        guard(model, prepared[0])
    return prepared


def patch_batch(
    model, pb: PairBatch, todo: list[tuple[str, int, int]], engine: str, check: bool
) -> tuple[dict[tuple, tuple[Tensor, Tensor]], Tensor]:
    """(patched LD, IIA hit) per prompt for every (kind, layer, head) and the clean LD, from one
    base and one source run; head -1 patches the whole site. `check`: guard every site."""
    kinds_layers = sorted({(k, layer) for k, layer, _ in todo})
    preps = prepare_sites(model, pb, kinds_layers, engine)
    out = {}
    with torch.no_grad():
        for kind, layer, h in todo:
            prep = preps[(kind, layer)]
            if check and h < 0:
                guard(model, prep)
            logits = patched_end_logits(model, prep, full if h < 0 else head(h))
            ld = metrics.logit_diff(logits, pb.base.answer, pb.base.other)
            out[(kind, layer, h)] = (ld, (logits.argmax(-1) == pb.label).float())
    return out, preps[kinds_layers[0]].clean_ld


def patch_each(
    model, batches: list[PairBatch], todo: list[tuple[str, int, int]], engine: str = "auto"
) -> tuple[dict[tuple, tuple[Tensor, Tensor]], Tensor]:
    """Full-component or single-head patches, one at a time: per (kind, layer, head), the
    patched LD and IIA hits of every pair, and the clean LD."""
    engine = choose_engine(model, engine, batches, todo[0][0])
    results: dict[tuple, list] = {s: [] for s in todo}
    clean = []
    for i, pb in enumerate(tqdm(batches, desc=f"patching {len(todo)} sites ({engine})")):
        res, clean_ld = patch_batch(model, pb, todo, engine, check=i == 0)
        clean.append(clean_ld)
        for s, r in res.items():
            results[s].append(r)
    cat = lambda rs: tuple(torch.cat(t) for t in zip(*rs, strict=True))  # noqa: E731
    return {s: cat(rs) for s, rs in results.items()}, torch.cat(clean)


def tolerance(logits: Tensor) -> float:
    """Allowed max |Δ| between engine and model logits for this dtype."""
    scale = logits.abs().max().item()
    if logits.dtype == torch.float32 or logits.dtype == torch.float64:
        return 1e-3 * scale + 1e-4
    return 2e-2 * scale + 1e-2  # bfloat16 / float16


def _other_engines(failed: str) -> str:
    """The engines to try instead of `failed`, as text."""
    others = [e for e in ("cache", "full") if e != failed]
    return " or ".join(f"method.engine={e}" for e in others)


def guard(model, prep: Prepared) -> float:
    """Stop with one line unless the engine's unpatched logits equal the model's own."""
    with torch.no_grad():
        ours = patched_end_logits(model, prep, lambda base, source: base)
    diff = (ours - prep.clean_logits).abs().max().item()
    tol = tolerance(prep.clean_logits)
    if not diff <= tol:
        raise EngineMismatchError(
            f"engine {prep.engine!r} on model {model.cfg.model_name!r} at {prep.name}: unpatched "
            f"END logits differ from the model's own by max |Δ| = {diff:.3g} (tolerance {tol:.3g}); "
            f"stopping before any training (try {_other_engines(prep.engine)})"
        )
    return diff


def patched_act(prep: Prepared, setter: Setter) -> Float[Tensor, "b d"]:
    """The patched site activation in the site's dtype (as a hook's `put` writes it): a
    float32 direction patches a bfloat16 model's activation in float32, then rounds it."""
    return setter(prep.base_act, prep.source_act).to(prep.base_act.dtype)


def patched_end_logits(model, prep: Prepared, setter: Setter) -> Float[Tensor, "b vocab"]:
    """END logits of the base prompts with the site patched by `setter`."""
    if prep.engine == "kernel":
        return fastpath.resume(model, prep.state, patched_act(prep, setter))
    if prep.engine == "cache":
        return cache.resume(model, prep.state, prep.name, setter, prep.source_act)
    base = prep.pairs.base
    return patched_logits(model, base, {prep.name: prep.source_act}, {prep.name: setter})


def patched_end_loss(model, prep: Prepared, setter: Setter) -> Tensor:
    """Mean cross-entropy of the patched END logits against the counterfactual labels."""
    if prep.engine == "kernel":
        return fastpath.resume_loss(model, prep.state, patched_act(prep, setter), prep.pairs.label)
    logits = patched_end_logits(model, prep, setter)
    return torch.nn.functional.cross_entropy(logits, prep.pairs.label)


def evaluate(model, prepared: list[Prepared], setter: Setter) -> dict[str, float]:
    """Patched LD, FLDD, IIA and flip rate over all prepared batches."""
    lds, clean, hits = [], [], []
    with torch.no_grad():
        for p in prepared:
            logits = patched_end_logits(model, p, setter)
            b = p.pairs.base
            lds.append(metrics.logit_diff(logits, b.answer, b.other))
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
