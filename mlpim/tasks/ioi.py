"""IOI (indirect object identification) prompts and base/source pairs for patching.

A prompt's pattern names its three name slots: the two names in order of first mention, then
the repeated subject S. E.g. ABB = "A and B ... B gave ... to" (answer: the indirect object A).
CDD/DCD have the shapes of ABB/BAB, with names disjoint from the partner prompt of a pair.
Token positions count the BOS token at position 0.
"""

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from jaxtyping import Int
from torch import Tensor

from mlpim.engine.batch import PairBatch, PromptBatch, left_pad
from mlpim.tasks.tokenizer import bos_id, pad_id

logger = logging.getLogger(__name__)

PATTERNS = ("ABB", "BAB", "ABA", "BAA", "CDD", "DCD")
FRESH_PATTERNS = ("CDD", "DCD")
SPLITS = ("train", "test")
MAX_TRIES = 20  # draws per requested prompt/pair before giving up on it
_POSITIONS = ("io_pos", "s1_pos", "s2_pos")


def s1_position(pattern: str) -> int:
    """0 if the repeated name S is the first-mentioned name, else 1."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown IOI pattern {pattern!r}; expected one of {PATTERNS}")
    return pattern[:2].index(pattern[2])


def patched_is_io(base_pattern: str, source_pattern: str) -> bool:
    """Label rule: the patched answer is the base IO iff base and source have S1 in one place."""
    return s1_position(base_pattern) == s1_position(source_pattern)


@dataclass(frozen=True)
class IOIBatch(PromptBatch):
    """IOI prompts, left-padded, patched at END; `answer` is IO and `other` is S."""

    io_pos: Int[Tensor, " batch"]
    s1_pos: Int[Tensor, " batch"]
    s2_pos: Int[Tensor, " batch"]
    pattern: tuple[str, ...]
    template: tuple[int, ...]
    text: tuple[str, ...]

    @property
    def io(self) -> Int[Tensor, " batch"]:
        """The indirect object's token ids (the answer)."""
        return self.answer

    @property
    def s(self) -> Int[Tensor, " batch"]:
        """The subject's token ids (the other name)."""
        return self.other


@dataclass(frozen=True)
class _Row:
    ids: list[int]
    io: int
    s: int
    io_pos: int
    s1_pos: int
    s2_pos: int
    pattern: str
    template: int
    text: str


@dataclass(frozen=True)
class _Pools:
    names: list[str]
    objects: list[str]
    places: list[str]
    templates: list[int]
    totals: dict[str, int]
    texts: list[str]  # all template strings, by index
    prefixes: list[str]
    share_names: bool = True


@dataclass(frozen=True)
class _Context:
    template: int
    prefix: str
    place: str
    obj: str


def one_token_words(tokenizer, words: Sequence[str]) -> list[str]:
    """The words w for which " " + w is exactly one (non-unknown) token."""
    out = []
    for word in words:
        ids = tokenizer(" " + str(word), add_special_tokens=False).input_ids
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            out.append(str(word))
    return out


def _half(items: Sequence, split: str) -> list:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    half = len(items) // 2
    items = [str(x) for x in items]
    return items[:half] if split == "train" else items[half:]


def _render(texts: list[str], ctx: _Context, names: Sequence[str]) -> str:
    body = texts[ctx.template].format(
        A=names[0], B=names[1], S=names[2], PLACE=ctx.place, OBJECT=ctx.obj
    )
    return ctx.prefix + body


def _encode(tokenizer, text: str, pattern: str, names: Sequence[str], template: int) -> _Row | None:
    """Tokenize a prompt; None unless IO appears once and S twice as single tokens, in order."""
    s_name = names[2]
    io_name = names[0] if names[1] == s_name else names[1]
    io_ids, s_ids = (
        tokenizer(" " + n, add_special_tokens=False).input_ids for n in (io_name, s_name)
    )
    if len(io_ids) != 1 or len(s_ids) != 1:
        return None
    ids = [bos_id(tokenizer), *tokenizer(text, add_special_tokens=False).input_ids]
    io_hits = [i for i, t in enumerate(ids) if t == io_ids[0]]
    s_hits = [i for i, t in enumerate(ids) if t == s_ids[0]]
    if len(io_hits) != 1 or len(s_hits) != 2:
        return None
    (io_pos,), (s1, s2) = io_hits, s_hits
    in_order = s1 < io_pos < s2 if s1_position(pattern) == 0 else io_pos < s1
    if not in_order:
        return None
    return _Row(
        ids=ids,
        io=io_ids[0],
        s=s_ids[0],
        io_pos=io_pos,
        s1_pos=s1,
        s2_pos=s2,
        pattern=pattern,
        template=template,
        text=text,
    )


def _template_ok(tokenizer, texts: list[str], template: int, names: list[str], obj, place) -> bool:
    """A template survives if probe prompts of both shapes tokenize with names in place."""
    if len(names) < 2:
        return False
    a, b = names[:2]
    ctx = _Context(template, "", place, obj)
    probes = (("ABB", (a, b, b)), ("BAB", (a, b, a)))
    return all(_encode(tokenizer, _render(texts, ctx, n), p, n, template) for p, n in probes)


def _filtered(tokenizer, cfg, split: str) -> _Pools:
    raw = {k: _half(cfg[k], split) for k in ("names", "objects", "places")}
    kept = {k: one_token_words(tokenizer, v) for k, v in raw.items()}
    texts, indices = [str(t) for t in cfg.templates], [int(i) for i in cfg[f"{split}_templates"]]
    obj, place = (kept[k][0] if kept[k] else "thing" for k in ("objects", "places"))
    templates = [t for t in indices if _template_ok(tokenizer, texts, t, kept["names"], obj, place)]
    totals = {k: len(v) for k, v in raw.items()} | {"templates": len(indices)}
    prefixes = [str(p) for p in cfg.prefixes] or [""]
    return _Pools(
        names=kept["names"],
        objects=kept["objects"],
        places=kept["places"],
        templates=templates,
        totals=totals,
        texts=texts,
        prefixes=prefixes,
        share_names=bool(cfg.get("share_names", True)),
    )


def _describe(pools: _Pools, split: str) -> str:
    kinds = ("names", "objects", "places", "templates")
    counts = ", ".join(f"{len(getattr(pools, k))}/{pools.totals[k]} {k}" for k in kinds)
    return f"IOI {split} split after one-token filtering keeps {counts}"


def _pools(tokenizer, cfg, split: str, min_names: int = 3) -> _Pools:
    """The split's surviving words and templates; ValueError if too few survive."""
    pools = _filtered(tokenizer, cfg, split)
    if len(pools.names) < max(3, min_names):
        raise ValueError(f"{_describe(pools, split)}: need >= {max(3, min_names)} names")
    if not (pools.objects and pools.places and pools.templates):
        raise ValueError(f"{_describe(pools, split)}: need >= 1 object, place and template")
    return pools


def _check_count(got: int, wanted: int, cfg, pools: _Pools, split: str, what: str) -> None:
    """ValueError if fewer than min(wanted, cfg.min_prompts) survived; warn on any shortfall."""
    message = (
        f"only {got} of {wanted} IOI {split} {what} survived tokenization checks "
        f"(min_prompts={cfg.min_prompts}); {_describe(pools, split)}"
    )
    if got < min(wanted, cfg.min_prompts):
        raise ValueError(message)
    if got < wanted:
        logger.warning(message)


def _draw_context(rng: random.Random, pools: _Pools) -> _Context:
    template, prefix = rng.choice(pools.templates), rng.choice(pools.prefixes)
    return _Context(template, prefix, rng.choice(pools.places), rng.choice(pools.objects))


def _draw_names(
    rng: random.Random, names: list[str], pattern: str, exclude: Sequence[str] = ()
) -> tuple[str, str, str]:
    """Distinct names for the pattern's letters, avoiding `exclude`; ordered as the pattern."""
    letters = list(dict.fromkeys(pattern))
    pool = [n for n in names if n not in set(exclude)]
    chosen = dict(zip(letters, rng.sample(pool, len(letters)), strict=True))
    return tuple(chosen[c] for c in pattern)


def _chunks(items: list, batch_size: int) -> list[list]:
    """Consecutive chunks of batch_size (prompts of mixed lengths are left-padded together)."""
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def _collate(rows: Sequence[_Row], pad_id: int) -> IOIBatch:
    tokens, mask, offset = left_pad([r.ids for r in rows], pad_id)
    shifted = {k: torch.tensor([getattr(r, k) for r in rows]) + offset for k in _POSITIONS}
    return IOIBatch(
        tokens=tokens,
        mask=mask,
        pos=torch.full((len(rows),), tokens.shape[1] - 1),
        answer=torch.tensor([r.io for r in rows]),
        other=torch.tensor([r.s for r in rows]),
        **shifted,
        pattern=tuple(r.pattern for r in rows),
        template=tuple(r.template for r in rows),
        text=tuple(r.text for r in rows),
    )


def _draw_prompt(tokenizer, pools: _Pools, rng: random.Random, pattern: str) -> _Row | None:
    for _ in range(MAX_TRIES):
        ctx = _draw_context(rng, pools)
        names = _draw_names(rng, pools.names, pattern)
        row = _encode(tokenizer, _render(pools.texts, ctx, names), pattern, names, ctx.template)
        if row is not None:
            return row
    return None


def make_prompts(
    tokenizer, cfg, split: str, patterns: Sequence[str], n: int, seed: int
) -> list[IOIBatch]:
    """n prompts of the split (patterns round robin), shuffled, in batches (left-padded).

    Raises ValueError if fewer than min(n, cfg.min_prompts) prompts or fewer than 3 names survive.
    """
    pools = _pools(tokenizer, cfg, split, min_names=3)
    rng = random.Random(seed)
    drawn = [_draw_prompt(tokenizer, pools, rng, patterns[i % len(patterns)]) for i in range(n)]
    rows = [r for r in drawn if r is not None]
    _check_count(len(rows), n, cfg, pools, split, "prompts")
    rng.shuffle(rows)
    return [_collate(g, pad_id(tokenizer)) for g in _chunks(rows, cfg.batch_size)]


def _pair_names(
    rng: random.Random, names: list[str], base: str, source: str, share: bool = True
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names per side. `share`: one letter is one name on both sides (as the authors' code), so
    ABB->BAB swaps only the order; else independent names. CDD/DCD letters are always fresh."""
    if share:
        letters = list(dict.fromkeys(base + source))
        chosen = dict(zip(letters, rng.sample(names, len(letters)), strict=True))
        return tuple(chosen[c] for c in base), tuple(chosen[c] for c in source)
    disjoint = base in FRESH_PATTERNS or source in FRESH_PATTERNS
    base_names = _draw_names(rng, names, base)
    return base_names, _draw_names(rng, names, source, base_names if disjoint else ())


def _draw_pair(
    tokenizer, pools: _Pools, rng: random.Random, base: str, source: str
) -> tuple[_Row, _Row] | None:
    for _ in range(MAX_TRIES):
        ctx = _draw_context(rng, pools)
        names = _pair_names(rng, pools.names, base, source, pools.share_names)
        sides = zip((base, source), names, strict=True)
        b, s = (
            _encode(tokenizer, _render(pools.texts, ctx, n), p, n, ctx.template) for p, n in sides
        )
        if b is not None and s is not None and len(b.ids) == len(s.ids):
            return b, s
    return None


def _collate_pairs(pairs: Sequence[tuple[_Row, _Row]], pad_id: int) -> PairBatch:
    base, source = (_collate([p[i] for p in pairs], pad_id) for i in (0, 1))
    label = [b.io if patched_is_io(b.pattern, s.pattern) else b.s for b, s in pairs]
    return PairBatch(base, source, torch.tensor(label), cluster=base.template)


def make_pairs(
    tokenizer, cfg, split: str, combos: Sequence[tuple[str, str]], n_per_combo: int, seed: int
) -> list[PairBatch]:
    """n_per_combo (base, source) pairs per pattern combo, grouped by token length, in batches.

    Base and source share template, prefix, place and object; names are drawn per side.
    """
    uses_fresh = any(p in FRESH_PATTERNS for combo in combos for p in combo)
    pools = _pools(tokenizer, cfg, split, min_names=4 if uses_fresh else 3)
    return _pairs_from(tokenizer, cfg, pools, split, combos, n_per_combo, seed)


def _pairs_from(
    tokenizer,
    cfg,
    pools: _Pools,
    split: str,
    combos: Sequence[tuple[str, str]],
    n_per_combo: int,
    seed: int,
) -> list[PairBatch]:
    rng = random.Random(seed)
    wanted = [combo for combo in combos for _ in range(n_per_combo)]
    drawn = [_draw_pair(tokenizer, pools, rng, b, s) for b, s in wanted]
    pairs = [p for p in drawn if p is not None]
    _check_count(len(pairs), len(wanted), cfg, pools, split, "pairs")
    rng.shuffle(pairs)
    return [_collate_pairs(g, pad_id(tokenizer)) for g in _chunks(pairs, cfg.batch_size)]


def paper_pairs(tokenizer, cfg, split: str, seed: int) -> list[PairBatch]:
    """The paper's DAS data: train {ABB,BAB}^2 (half same-pattern); test ABB<->BAB."""
    if split == "train":
        combos = [(b, s) for b in ("ABB", "BAB") for s in ("ABB", "BAB")]
        return make_pairs(tokenizer, cfg, split, combos, cfg.n_train_pairs // 4, seed)
    combos = [("ABB", "BAB"), ("BAB", "ABB")]
    return make_pairs(tokenizer, cfg, split, combos, cfg.n_test_pairs // 2, seed)


def held_out_pairs(tokenizer, cfg, seed: int) -> dict[str, list[PairBatch]]:
    """ABB<->BAB pairs that hold out one thing at a time: "new templates" (test templates, train
    names, objects and places) and "new names" (test names, train templates, objects, places)."""
    train, test = _pools(tokenizer, cfg, "train"), _pools(tokenizer, cfg, "test")
    mixed = {
        "new templates": replace(train, templates=test.templates),
        "new names": replace(train, names=test.names),
    }
    combos = [("ABB", "BAB"), ("BAB", "ABB")]
    n = cfg.n_test_pairs // 2
    return {k: _pairs_from(tokenizer, cfg, pools, k, combos, n, seed) for k, pools in mixed.items()}


def filter_report(tokenizer, cfg) -> dict[str, int]:
    """Surviving (and total) names/objects/places/templates per split."""
    report = {}
    for split in SPLITS:
        pools = _filtered(tokenizer, cfg, split)
        for kind in ("names", "objects", "places", "templates"):
            report[f"{split}_{kind}"] = len(getattr(pools, kind))
            report[f"{split}_{kind}_total"] = pools.totals[kind]
    return report
