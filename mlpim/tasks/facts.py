"""Factual recall as a task: facts (subject, relation, attribute), the facts a model knows, and
counterfactual pairs of facts patched at the last subject token.

mlpim ships its own fact set (`data/facts.jsonl`, one JSON object per line with `relation_id`,
`subject`, `attribute`, `template`). `load_facts(path)` also reads ROME's "known facts" JSON: a
list of records with `subject`, `attribute`, `prompt`, `template` (`{}` for the subject) and
`relation_id`.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpim.engine.batch import PairBatch
from mlpim.errors import ConfigError
from mlpim.tasks import pairs as P
from mlpim.tasks.pairs import (
    Pair,
    TaskProblems,
    answer_problem,
    answer_tokens,
    encode,
    split_keys,
    task_file,
)
from mlpim.tasks.tokenizer import bos_id, pad_id

logger = logging.getLogger(__name__)

BUNDLED = Path(__file__).parent / "data" / "facts.jsonl"
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class Fact:
    """A fact: `template` has `{}` where the subject goes; the attribute completes the prompt."""

    relation: str
    subject: str
    attribute: str
    template: str

    @property
    def prompt(self) -> str:
        """The template with the subject filled in."""
        return self.template.replace("{}", self.subject, 1)


def _records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) of a JSON list (ROME format) or a JSONL file, detected by content."""
    text = path.read_text()
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        return [(f"record {i}", r) for i, r in enumerate(json.loads(text))]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as err:
                out.append((f"line {n}", ValueError(f"not valid JSON ({err.msg})")))
    return out


def _fact(record: Any) -> Fact | str:
    """The fact of one record, or what is wrong with it."""
    if isinstance(record, ValueError):
        return str(record)
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    relation = record.get("relation_id", record.get("relation"))
    subject, attribute = record.get("subject"), record.get("attribute")
    template = record.get("template")
    if template is None and isinstance(record.get("prompt"), str) and subject:
        template = record["prompt"].replace(subject, "{}", 1)
    fields = {
        "relation_id": relation,
        "subject": subject,
        "attribute": attribute,
        "template": template,
    }
    missing = [k for k, v in fields.items() if not isinstance(v, str) or not v.strip()]
    if missing:
        return f"missing field(s) {missing}"
    if template.count("{}") != 1:
        return f"template {template!r} must contain '{{}}' exactly once"
    return Fact(str(relation), subject, attribute.strip(), template)


def load_facts(path: str | Path | None = None) -> list[Fact]:
    """The bundled fact set, or the facts of a JSONL / ROME known-facts JSON file.

    Bad records are reported together as one ConfigError; repeated (relation, subject,
    template) records are dropped with a warning, keeping the first.
    """
    path = BUNDLED if path is None else task_file(path)
    problems, facts, seen = TaskProblems(f"fact file {path}"), [], set()
    for where, record in _records(path):
        fact = _fact(record)
        if isinstance(fact, str):
            problems.add(where, fact)
            continue
        key = (fact.relation, fact.subject, fact.template)
        if key in seen:
            logger.warning("%s %s: repeated fact %s dropped", path.name, where, key)
            continue
        seen.add(key)
        facts.append(fact)
    problems.raise_if_any()
    return facts


def relation_counts(facts: Sequence[Fact]) -> dict[str, int]:
    """Number of facts per relation."""
    return dict(Counter(f.relation for f in facts))


def known_facts(
    facts: Sequence[Fact], predict_first_token: Callable[[list[str]], Sequence[int]], tokenizer
) -> tuple[list[Fact], dict[str, dict[str, int]]]:
    """The facts the model gets right, and {relation: {"known": k, "total": n}}.

    `predict_first_token` maps prompt texts (`Fact.prompt`, without BOS: it encodes them as the
    tasks do, BOS first) to the model's argmax next-token ids. A fact is known when that argmax
    is the first token of its attribute (" " + attribute).
    """
    predicted = list(predict_first_token([f.prompt for f in facts]))
    if len(predicted) != len(facts):
        raise ValueError(f"predict_first_token gave {len(predicted)} ids for {len(facts)} prompts")
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"known": 0, "total": 0})
    kept = []
    for fact, token in zip(facts, predicted, strict=True):
        counts[fact.relation]["total"] += 1
        if int(token) == answer_tokens(tokenizer, fact.attribute)[0]:
            counts[fact.relation]["known"] += 1
            kept.append(fact)
    return kept, dict(counts)


def one_token_facts(facts: Sequence[Fact], tokenizer) -> list[Fact]:
    """The facts whose attribute is one token for this tokenizer (others logged and dropped)."""
    kept = [f for f in facts if answer_problem(tokenizer, f.attribute) is None]
    if len(kept) < len(facts):
        dropped = sorted({f.attribute for f in facts} - {f.attribute for f in kept})
        logger.warning(
            "dropped %d of %d fact(s) whose attribute is not one token: %s",
            len(facts) - len(kept),
            len(facts),
            dropped,
        )
    return kept


def split_facts(facts: Sequence[Fact], split: str, test_fraction: float, seed: int) -> list[Fact]:
    """The facts of one split; subjects are split, so no subject is in both train and test."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split == "all":
        return list(facts)
    train, test = split_keys((f.subject for f in facts), test_fraction, seed)
    side = train if split == "train" else test
    return [f for f in facts if f.subject in side]


def _pair(base: Fact, source: Fact) -> Pair:
    meta = {
        "relation": base.relation,
        "template": base.template,
        "subject": base.subject,
        "source_subject": source.subject,
    }
    return Pair(
        base.prompt,
        source.prompt,
        base.attribute,
        source.attribute,
        position="span",
        base_span=base.subject,
        source_span=source.subject,
        meta=meta,
    )


def _group_pairs(group: list[Fact], rng: random.Random, per_fact: int) -> list[Pair]:
    """Up to `per_fact` pairs per base fact, sources of another attribute (and subject)."""
    pairs = []
    for base in group:
        others = [f for f in group if f.attribute != base.attribute and f.subject != base.subject]
        pairs += [_pair(base, s) for s in rng.sample(others, min(per_fact, len(others)))]
    return pairs


def fact_pairs(
    facts: Sequence[Fact],
    tokenizer,
    bos_id: int,
    seed: int,
    split: str = "train",
    test_fraction: float = 0.5,
    pairs_per_fact: int = 1,
    max_pairs: int | None = None,
) -> list[Pair]:
    """Counterfactual pairs of two facts with one relation template and different attributes.

    Patched at the last token of the subject in both prompts; base answer = base attribute,
    source answer and label = source attribute. Facts whose attribute is not one token are
    dropped; train/test are split by subject. Shuffled with `seed`, cut to `max_pairs`.
    """
    usable = split_facts(one_token_facts(facts, tokenizer), split, test_fraction, seed)
    groups: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for fact in usable:
        groups[(fact.relation, fact.template)].append(fact)
    rng = random.Random(seed)
    pairs = [p for key in sorted(groups) for p in _group_pairs(groups[key], rng, pairs_per_fact)]
    rng.shuffle(pairs)
    pairs = pairs[:max_pairs] if max_pairs is not None else pairs
    encoded = encode(pairs, tokenizer, bos_id, min_pairs=0, drop_invalid=True)
    if not encoded:
        raise ConfigError(f"no fact pairs in split {split!r} ({len(usable)} usable facts)")
    return [e.pair for e in encoded]


@dataclass
class FactTask:
    """Known facts, and per split the pairs (with relation/subject metadata) and their batches."""

    facts: list[Fact]
    pairs: dict[str, list[Pair]]
    batches: dict[str, list[PairBatch]]


def fact_task(
    tokenizer,
    dataset,
    seed: int,
    predict: Callable[[list[str]], Sequence[int]] | None,
    n_ctx: int | None = None,
) -> FactTask:
    """The fact pairs of `dataset` (as `task_splits` builds them), keeping each pair's metadata;
    `predict` keeps only the facts the model knows (None: all one-token facts); pairs longer
    than `n_ctx` tokens are dropped. Every drop is counted in a WARNING."""
    facts = one_token_facts(load_facts(dataset.path), tokenizer)
    if dataset.relations:
        facts = [f for f in facts if f.relation in set(dataset.relations)]
    if predict is not None:
        n = len(facts)
        facts, _ = known_facts(facts, predict, tokenizer)
        if len(facts) < n:
            logger.warning(
                "dropped %d of %d fact(s) the model does not know (known_only)", n - len(facts), n
            )
    encoded = {}
    for split, n in (("train", dataset.n_train_pairs), ("test", dataset.n_test_pairs)):
        rows = fact_pairs(
            facts,
            tokenizer,
            bos_id(tokenizer),
            seed,
            split,
            dataset.test_fraction,
            dataset.pairs_per_fact,
            n,
        )
        encoded[split] = P.encode(
            rows, tokenizer, bos_id(tokenizer), drop_invalid=True, max_len=n_ctx
        )
    n_valid = sum(len(e) for e in encoded.values())
    P.check_splits(f"fact set {dataset.path or BUNDLED.name}", encoded, n_valid, dataset.min_pairs)
    pairs = {s: [e.pair for e in enc] for s, enc in encoded.items()}
    batches = {
        s: P.batches(enc, dataset.batch_size, pad_id(tokenizer)) for s, enc in encoded.items()
    }
    return FactTask(facts, pairs, batches)
