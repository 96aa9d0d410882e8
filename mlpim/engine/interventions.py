"""Prepare pairs once, then evaluate any intervention on them; the engine and its runtime guard.

Three engines compute the same patched END logits:
- `cache`: the model's own forward resumed from its own KV cache (any architecture);
- `kernel`: the hand-written END-only kernel (`fastpath`, GPT-2/Llama/Gemma 3 shapes, patch at END);
- `full`: the whole forward with a hook (the reference).
`auto` takes the kernel where it applies and the cache engine elsewhere. Whichever runs, the
guard compares its unpatched logits on the first batch with the model's own and stops the run
before any training when they differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mlpim import reuse
from mlpim.engine import cache, fastpath, metrics
from mlpim.engine.batch import PairBatch, PromptBatch
from mlpim.engine.family import family_of
from mlpim.engine.fused_ce import unembed_ce, unembed_ce_rows
from mlpim.engine.models import ConfigError, validate_site
from mlpim.engine.patching import (
    Setter,
    at,
    full,
    head,
    length_groups,
    patched_logits,
    run_cache,
    select_rows,
    source_acts,
)

log = logging.getLogger(__name__)
ENGINES = ("auto", "kernel", "cache", "full")


class EngineMismatchError(ConfigError):
    """The engine's unpatched logits differ from the model's own: its numbers would be wrong."""


@dataclass
class Prepared:
    """One pair batch with its site activations and unpatched END logits."""

    pairs: PairBatch  # on the model's input device (`model.cfg.device`)
    name: str  # hook name of the site
    engine: str  # kernel | cache | full
    base_act: Float[Tensor, "b ..."]  # at each base prompt's patch position (site's device)
    source_act: Float[Tensor, "b ..."]  # at each source prompt's patch position (site's device)
    clean_logits: Float[Tensor, "b vocab"]  # the model's own END logits of the base prompts,
    # on the pairs' device, as every engine's patched logits are returned
    state: fastpath.EndState | cache.CacheState | None
    # (base, source) activations of other hooks read in the same runs (`prepare`'s `also`)
    extra: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def clean_ld(self) -> Float[Tensor, " b"]:
        b = self.pairs.base
        return metrics.logit_diff(self.clean_logits, b.answer, b.other)


def choose_engine(model, engine: str, batches: list[PairBatch], kind: str) -> str:
    """The engine `engine` resolves to for these batches (auto: kernel where it applies)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown method.engine {engine!r}; allowed: {', '.join(ENGINES)}")
    why = family_of(model).kernel_refusal
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


def prepare_sites(
    model, pb: PairBatch, sites: list[Site], engine: str, also: tuple[str, ...] = ()
) -> dict[Site, Prepared]:
    """For several sites of one batch: the base runs (END logits, site activations, and the
    kernel's state or the model's own KV cache) and the source runs up to the last site's block
    (a source that is its own base prompt, as IOI's same-pattern pairs, takes the base run's
    activations), all without gradients. The hooks `also` are read in the same runs (`extra`)."""
    names = {s: validate_site(model, *s) for s in sites}
    read = sorted(set(names.values()) | set(also))
    if engine == "cache":
        logits, acts, states = cache_base(model, pb.base, names, read)
    else:
        logits, acts, states = grouped_base(model, pb.base, names, read, engine == "kernel")
    source = source_acts(model, pb.base, pb.source, read, acts)  # own rows: no run
    logits = logits.to(pb.base.tokens.device)
    extra = {n: (acts[n], source[n]) for n in also}
    return {
        site: Prepared(pb, name, engine, acts[name], source[name], logits, states[site], extra)
        for site, name in names.items()
    }


def cache_base(
    model, base: PromptBatch, names: dict[Site, str], read: list[str]
) -> tuple[Tensor, dict, dict]:
    """The cache engine's base run: (END logits, hook -> activation of each of `read`, site ->
    the shared CacheState), from one full forward of the whole batch (the model's own KV cache)."""
    logits, acts, state = cache.base_run(model, base, set(read))
    return logits, {n: at(acts[n], base.pos) for n in read}, dict.fromkeys(names, state)


def grouped_base(
    model, base: PromptBatch, names: dict[Site, str], read: list[str], kernel: bool
) -> tuple[Tensor, dict, dict]:
    """Base runs of row groups of similar length (`length_groups`): (END logits, hook ->
    activation of each of `read`, site -> the kernel's EndState or None), in the batch's order."""
    wanted = set(read)
    if kernel:
        wanted |= set().union(*(fastpath.state_names(model, *s) for s in names))
    parts = []
    for rows in length_groups(base.mask):
        sub = select_rows(base, rows)
        logits, run = run_cache(model, sub, wanted)
        acts = {n: at(run[n], sub.pos) for n in read}
        states = {s: fastpath.state_from_cache(model, run, *s, sub.mask) for s in names if kernel}
        parts.append((rows, logits, acts, states))
    order = torch.cat([p[0] for p in parts]).argsort()  # row i of the batch
    logits = _in_order([p[1] for p in parts], order)
    acts = {n: _in_order([p[2][n] for p in parts], order) for n in read}
    states = dict.fromkeys(names)
    for s in names if kernel else ():
        parts_s = [(p[0], p[3][s]) for p in parts]
        states[s] = fastpath.merge_states(parts_s, len(base), base.tokens.shape[1] - 1)
    return logits, acts, states


def _in_order(parts: list[Tensor], order: Tensor) -> Tensor:
    """The row groups' tensors concatenated, rows put back in `order`, on their own device."""
    x = torch.cat(parts)
    return x[order.to(x.device)]


def prepare(
    model,
    batches: list[PairBatch],
    kind: str,
    layer: int,
    engine: str = "auto",
    also: tuple[str, ...] = (),
) -> list[Prepared]:
    """Prepare every batch at site (kind, layer), then check the engine (`guard`); the hooks
    `also` are read in the same runs (`Prepared.extra`)."""
    validate_site(model, kind, layer)
    if kind == "resid_mid":
        raise ConfigError(
            "resid_mid cannot be patched: TransformerBridge's hook_resid_mid only feeds the MLP's input; patch resid_post of layer-1 or attn_out instead"
        )
    chosen = choose_engine(model, engine, batches, kind)
    key = lambda: (*reuse.model_key(model), reuse.digest(batches), kind, layer, chosen, also)  # noqa: E731
    compute = lambda: _prepare(model, batches, (kind, layer), chosen, also)  # noqa: E731
    verify = lambda kept: agrees(model, kept, kind, layer)  # noqa: E731
    return list(reuse.memo("prepare", key, compute, verify=verify))


def agrees(model, kept: list[Prepared], kind: str, layer: int, rows: int = 4) -> bool:
    """Whether kept preparations (read from disk) are what this model computes: the first batch's
    first `rows` pairs prepared again agree within `tolerance`, and the engine resumes the
    first batch to its kept clean logits (`guard`). In 16 bits the whole first batch is prepared
    again: there a batch's shape moves its values by more than `tolerance` (docs/engine.md)."""
    if not kept:
        return True
    p = kept[0]
    first = p.pairs.head(rows) if wide(p.clean_logits) else p.pairs
    fresh = prepare_sites(model, first, [(kind, layer)], p.engine, tuple(p.extra))[(kind, layer)]
    kept_parts = ("clean_logits", "base_act", "source_act")
    pairs = [(getattr(fresh, f), getattr(p, f)) for f in kept_parts]
    pairs += [(a, b) for n in p.extra for a, b in zip(fresh.extra[n], p.extra[n], strict=True)]
    if not all(leads(a, b) for a, b in pairs):
        return False
    try:
        guard(model, p)
    except EngineMismatchError:
        return False
    return True


def _prepare(
    model, batches: list[PairBatch], site: Site, engine: str, also: tuple[str, ...]
) -> list[Prepared]:
    desc = f"prepare {site[0]} L{site[1]} ({engine})"
    bar = tqdm(batches, desc=desc, leave=False, disable=len(batches) < 4)
    prepared = [prepare_sites(model, pb, [site], engine, also)[site] for pb in bar]
    if prepared:
        guard(model, prepared[0])
    return prepared


def prepared_key(model, prepared: list[Prepared] | None) -> str | None:
    """A content hash of prepared batches (weights, pairs, site, engine, activations); None for
    None."""
    if prepared is None:
        return None
    parts = [(p.name, p.engine, p.pairs, p.base_act, p.source_act) for p in prepared]
    return reuse.digest(reuse.weights_hash(model), parts)


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


def wide(x: Tensor) -> bool:
    """Whether `x` is float32 or float64 (else 16 bits, with their own tolerance)."""
    return x.dtype in (torch.float32, torch.float64)


def tolerance(logits: Tensor) -> float:
    """Allowed max |Δ| between engine and model logits for this dtype."""
    scale = logits.abs().max().item()
    if wide(logits):
        return 1e-3 * scale + 1e-4
    return 2e-2 * scale + 1e-2  # bfloat16 / float16


def leads(fresh: Tensor, kept: Tensor) -> bool:
    """Whether `fresh` equals the first rows of `kept` within `tolerance`."""
    return (fresh - kept[: len(fresh)]).abs().max().item() <= tolerance(kept)


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
    """END logits of the base prompts with the site patched by `setter`, on the pairs' device."""
    base = prep.pairs.base
    if prep.engine == "kernel":
        logits = fastpath.resume(model, prep.state, patched_act(prep, setter))
    elif prep.engine == "cache":
        logits = cache.resume(model, prep.state, prep.name, setter, prep.source_act)
    else:
        logits = patched_logits(model, base, {prep.name: prep.source_act}, {prep.name: setter})
    return logits.to(base.tokens.device)


def patched_end_lds(model, prep: Prepared, setter: Setter) -> Float[Tensor, " b"]:
    """Per base prompt, the patched END logit difference (answer − other), on the pairs' device.
    Where the unembedding is linear (the kernel's; the cache engine's where `linear_unembed`
    holds) it reads two unembedding columns, not the whole vocabulary."""
    b = prep.pairs.base
    if prep.engine == "kernel":
        h = fastpath.resume_hidden(model, prep.state, patched_act(prep, setter))
    elif prep.engine == "cache" and linear_unembed(model, prep):
        h = cache.resume_hidden(model, prep.state, prep.name, setter, prep.source_act)
    else:
        return metrics.logit_diff(patched_end_logits(model, prep, setter), b.answer, b.other)
    w_t, bias = fastpath.unembed_weights(model)
    answer, other = b.answer.to(w_t.device), b.other.to(w_t.device)
    lds = metrics.column_diff(h.to(w_t.device), w_t, bias, answer, other)
    return lds.to(b.tokens.device)


def patched_end_loss(model, prep: Prepared, setter: Setter) -> Tensor:
    """Mean cross-entropy of the patched END logits against the counterfactual labels. The
    kernel, and the cache engine where `linear_unembed` holds, fuse the unembedding with it."""
    if prep.engine == "kernel":
        return fastpath.resume_loss(model, prep.state, patched_act(prep, setter), prep.pairs.label)
    if prep.engine == "cache" and linear_unembed(model, prep):
        h = cache.resume_hidden(model, prep.state, prep.name, setter, prep.source_act)
        return unembed_ce(h, *fastpath.unembed_weights(model), prep.pairs.label)
    logits = patched_end_logits(model, prep, setter)
    return torch.nn.functional.cross_entropy(logits, prep.pairs.label)


def interleaved(setters: list[Setter]) -> Setter:
    """One setter for a batch whose rows are repeated once per setter (row i·n + j: row i of
    the source, patched by setter j); the sources are the batch's own, not repeated."""
    n = len(setters)

    def setter(base: Float[Tensor, "bn ..."], source: Float[Tensor, "b ..."]) -> Tensor:
        rows = base.view(source.shape[0], n, *base.shape[1:])
        return torch.stack([s(rows[:, j], source) for j, s in enumerate(setters)], 1).flatten(0, 1)

    return setter


def patched_end_losses(model, prep: Prepared, setters: list[Setter]) -> Float[Tensor, " n"]:
    """Each setter's `patched_end_loss`, from ONE resume over the batch's rows repeated once per
    setter (the weights are read once for all of them); differentiable in each setter's own
    parameters."""
    n, setter = len(setters), interleaved(setters)
    labels = prep.pairs.label.repeat_interleave(n)
    if prep.engine == "kernel":
        acts = torch.stack([patched_act(prep, s) for s in setters], 1).flatten(0, 1)
        rows = fastpath.resume_losses(model, fastpath.repeat_rows(prep.state, n), acts, labels)
    elif prep.engine == "cache" and linear_unembed(model, prep):
        state = cache.repeat_rows(prep.state, n)
        h = cache.resume_hidden(model, state, prep.name, setter, prep.source_act)
        rows = unembed_ce_rows(h, *fastpath.unembed_weights(model), labels)
    elif prep.engine == "cache":
        state = cache.repeat_rows(prep.state, n)
        logits = cache.resume(model, state, prep.name, setter, prep.source_act)
        rows = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    else:
        base = repeat_prompts(prep.pairs.base, n)
        logits = patched_logits(model, base, {prep.name: prep.source_act}, {prep.name: setter})
        rows = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return rows.view(-1, n).mean(0)


def repeat_prompts(batch: PromptBatch, n: int) -> PromptBatch:
    """The batch with each row repeated n times in a row (row i·n + j is row i)."""
    rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731
    return PromptBatch(
        rep(batch.tokens), rep(batch.mask), rep(batch.pos), rep(batch.answer), rep(batch.other)
    )


def linear_unembed(model, prep: Prepared) -> bool:
    """Whether the model's END logits are its unembedding's input times W_U plus b_U (no logit
    soft-capping or other head), checked once per model against its own unpatched logits."""
    key = "_mlpim_linear_unembed"
    if key not in model.__dict__:
        ok = cache.UNEMBED_IN in model.hook_dict
        if ok:
            keep = lambda base, source: base  # noqa: E731
            with torch.no_grad():
                h = cache.resume_hidden(model, prep.state, prep.name, keep, prep.source_act)
                logits = cache.resume(model, prep.state, prep.name, keep, prep.source_act)
            w_t, b = fastpath.unembed_weights(model)
            ours = h.to(w_t.device) @ w_t.T + b
            ok = (ours - logits.to(w_t.device)).abs().max().item() <= tolerance(logits)
        model.__dict__[key] = ok
    return model.__dict__[key]


def patched_fldd(model, prepared: list[Prepared], setter: Setter) -> float:
    """`evaluate`'s FLDD alone, from the patched logit differences (`patched_end_lds`)."""
    with torch.no_grad():
        ld = torch.cat([patched_end_lds(model, p, setter) for p in prepared])
    return metrics.fldd(ld, torch.cat([p.clean_ld for p in prepared]))


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
