"""A task as data: counterfactual (base, source) prompt pairs, read from JSONL and encoded.

One JSON object per line. Fields:

| field           | required             | meaning                                                  |
|-----------------|----------------------|----------------------------------------------------------|
| `base`          | yes                  | base prompt text (without BOS: BOS is prepended)         |
| `source`        | yes                  | source prompt, whose activation is patched into base     |
| `base_answer`   | yes                  | word the base run predicts next (one token, see below)   |
| `source_answer` | yes                  | word the source run predicts next (one token)            |
| `position`      | no                   | where to patch: `"end"` (default), `"span"` or `"index"` |
| `base_span`     | if `position=span`   | substring of `base`; its last token is patched           |
| `source_span`   | if `position=span`   | substring of `source`; its last token is patched         |
| `base_pos`      | if `position=index`  | token index in base, BOS = 0                             |
| `source_pos`    | if `position=index`  | token index in source, BOS = 0                           |
| `label`         | no                   | word the patched base run should give; default `source_answer` |
| `meta`          | no                   | object of free metadata, e.g. relation, template, subject |

Rules:
- Answers: the answer token is the tokenization of `" " + word` (`word` itself if it already
  starts with a space); it must be exactly one token, not the unknown token.
- Prompts are encoded as `[BOS] + tokenizer(text, add_special_tokens=False)`, so token index 0
  is BOS and END is the last token of the prompt.
- `"span"`: the patched token is the last token of the span's FIRST occurrence in the prompt
  (the token holding the span's last character). E.g. span "Paris" in "The city of Paris is in"
  is token 4 (0: BOS, 1: The, 2: city, 3: of, 4: Paris).
- `position` may be left out: then `"span"` if `base_span` is given, `"index"` if `base_pos` is
  given, else `"end"`.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from mlpim.engine.batch import PairBatch, PromptBatch, left_pad
from mlpim.errors import ConfigError
from mlpim.files import atomic_write

logger = logging.getLogger(__name__)

POSITIONS = ("end", "span", "index")
REQUIRED = ("base", "source", "base_answer", "source_answer")
OPTIONAL = ("position", "base_span", "source_span", "base_pos", "source_pos", "label", "meta")
MAX_LINES = 50  # problem lines shown in one error; the rest are counted
T = TypeVar("T")


@dataclass(frozen=True)
class Pair:
    """One counterfactual pair (see the module docstring for the fields and rules)."""

    base: str
    source: str
    base_answer: str
    source_answer: str
    position: str = "end"
    base_span: str | None = None
    source_span: str | None = None
    base_pos: int | None = None
    source_pos: int | None = None
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    origin: str | None = field(default=None, compare=False, hash=False)  # e.g. "task.jsonl line 3"

    @property
    def label_word(self) -> str:
        """The answer the patched base run should give."""
        return self.label if self.label is not None else self.source_answer

    def to_json(self) -> dict[str, Any]:
        """The JSONL record: required fields, plus the optional ones that are set."""
        record = {k: v for k, v in asdict(self).items() if k != "origin"}
        return {k: v for k, v in record.items() if k in REQUIRED or v not in (None, {})}


@dataclass(frozen=True)
class EncodedPair:
    """A pair as token ids: prompts start with BOS; positions count BOS at 0."""

    base_ids: tuple[int, ...]
    source_ids: tuple[int, ...]
    base_pos: int
    source_pos: int
    base_answer: int
    source_answer: int
    label: int
    pair: Pair


class TaskProblems:
    """Collects one line per problem and raises them as one `ConfigError`."""

    def __init__(self, what: str):
        self.what, self.lines, self.kinds, self.places = what, [], [], []

    def add(self, where: str, message: str, kind: str = "invalid") -> None:
        """Record one problem at `where`."""
        self.lines.append(f"{where}: {message}")
        self.kinds.append(kind)
        self.places.append(where)

    def extend(self, other: TaskProblems) -> None:
        """Add the problems of `other`."""
        self.lines += other.lines
        self.kinds += other.kinds
        self.places += other.places

    def n_places(self) -> int:
        """How many places (lines, rows, pairs) have a problem."""
        return len(set(self.places))

    def by_reason(self) -> str:
        """`3 answer not one token, 1 duplicate`: how many places have each kind of problem."""
        kinds = Counter(k for _, k in dict.fromkeys(zip(self.places, self.kinds, strict=True)))
        return ", ".join(f"{n} {k}" for k, n in kinds.most_common())

    def __bool__(self) -> bool:
        return bool(self.lines)

    def message(self) -> str:
        """All problems as one message (the first few lines, then a count)."""
        shown = self.lines[:MAX_LINES]
        more = len(self.lines) - len(shown)
        tail = [f"  ... and {more} more"] if more else []
        head = f"{self.what}: {len(self.lines)} problem(s)"
        return "\n".join([head, *(f"  {line}" for line in shown), *tail])

    def raise_if_any(self) -> None:
        """Raise `ConfigError` with the message when there is a problem."""
        if self.lines:
            raise ConfigError(self.message())


def _infer_position(record: dict[str, Any]) -> str:
    if "position" in record:
        return record["position"]
    if "base_span" in record:
        return "span"
    return "index" if "base_pos" in record else "end"


def _record_problems(record: Any) -> list[str]:
    """Problems with one parsed JSONL record (missing/unknown fields, bad types)."""
    if not isinstance(record, dict):
        return [f"expected a JSON object, got {type(record).__name__}"]
    out = [f"missing field {k!r}" for k in REQUIRED if k not in record]
    out += [f"unknown field {k!r}" for k in record if k not in REQUIRED + OPTIONAL]
    position = _infer_position(record)
    if position not in POSITIONS:
        return [*out, f"position {position!r} is not one of {POSITIONS}"]
    needs = {"span": ("base_span", "source_span"), "index": ("base_pos", "source_pos")}
    out += [
        f"missing field {k!r} (position={position!r})"
        for k in needs.get(position, ())
        if k not in record
    ]
    strings = [*REQUIRED, "base_span", "source_span", "label"]
    out += [
        f"field {k!r} must be a string"
        for k in strings
        if k in record and not isinstance(record[k], str)
    ]
    out += [
        f"field {k!r} must be an integer"
        for k in ("base_pos", "source_pos")
        if k in record and (type(record[k]) is not int)
    ]
    if "meta" in record and not isinstance(record["meta"], dict):
        out.append("field 'meta' must be an object")
    return out


def task_file(path: str | Path | None) -> Path:
    """`path` as a Path when it is a file; else one ConfigError line (none given, a directory,
    no such file)."""
    if path is None or str(path) in ("", "???"):
        raise ConfigError("no task file given: dataset.path=/path/to/task.jsonl")
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise ConfigError(f"dataset.path={path}: {what}; give a JSONL file of pairs")
    return path


def read_text(path: Path) -> str:
    """A task file's text (a UTF-8 BOM is dropped); one ConfigError naming the first line that
    is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8, line {line} (byte 0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


def task_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the task file's non-blank lines; one ConfigError for a file
    that holds none, only `#` lines, or one JSON array (the format is JSON Lines)."""
    text = read_text(path)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    jsonl = "write one JSON object per line (JSON Lines, docs/tasks.md)"
    if not lines:
        raise ConfigError(f"task file {path} is empty (no pairs): {jsonl}")
    if all(line.lstrip().startswith("#") for _, line in lines):
        raise ConfigError(f"task file {path} holds only # lines (no pairs; JSON has no comments)")
    if text.lstrip().startswith("["):
        raise ConfigError(f"task file {path} is a JSON array; {jsonl}")
    return lines


def read_jsonl(path: str | Path, problems: TaskProblems | None = None) -> list[Pair]:
    """The pairs of a JSONL task file; one ConfigError listing every bad line, or, given a
    `problems` collector, the good lines' pairs with the bad lines' problems added to it."""
    path = task_file(path)
    collect = problems is not None
    problems, pairs = problems if collect else TaskProblems(f"task file {path}"), []
    for n, line in task_lines(path):
        where = f"line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.add(where, f"not valid JSON ({err.msg} at column {err.colno})", "not JSON")
            continue
        found = _record_problems(record)
        for message in found:
            problems.add(where, message, "malformed record")
        if not found:
            record = {**record, "position": _infer_position(record)}
            pairs.append(Pair(**record, origin=f"{path.name} {where}"))
    if not collect:
        problems.raise_if_any()
    return pairs


def check_pairs_file(path: str | Path) -> None:
    """The task file read whole, as a run reads it: refused when it gives no pair at all."""
    problems = TaskProblems(f"task file {path}")
    if not read_jsonl(path, problems):
        problems.raise_if_any()


def write_jsonl(pairs: Iterable[Pair], path: str | Path) -> None:
    """Write pairs one JSON object per line (readable by `read_jsonl`)."""
    lines = [json.dumps(p.to_json(), ensure_ascii=False) for p in pairs]
    text = "".join(line + "\n" for line in lines)
    atomic_write(Path(path), lambda p: p.write_text(text))


def encode_prompt(tokenizer, bos_id: int, text: str) -> list[int]:
    """[BOS] + the text's tokens (no special tokens added by the tokenizer)."""
    return [bos_id, *tokenizer(text, add_special_tokens=False).input_ids]


def answer_tokens(tokenizer, word: str) -> list[int]:
    """Token ids of an answer word: " " + word, or word as is if it starts with a space."""
    text = word if word.startswith(" ") else " " + word
    return tokenizer(text, add_special_tokens=False).input_ids


def answer_problem(tokenizer, word: str) -> str | None:
    """Why `word` is not a one-token answer for this tokenizer (None if it is)."""
    ids = answer_tokens(tokenizer, word)
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return None
    pieces = [tokenizer.decode([i]) for i in ids]
    if len(ids) == 1:
        return f"answer {word!r} is the unknown token for this tokenizer"
    return f"answer {word!r} is {len(ids)} tokens for this tokenizer: {pieces}"


def span_position(tokenizer, text: str, span: str) -> int | None:
    """Index (BOS = 0) of the last token of `span`'s first occurrence in `text`; None if absent."""
    start = text.find(span)
    if not span or start < 0:
        return None
    end = start + len(span)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return sum(1 for a, _ in offsets["offset_mapping"] if a < end)
    return len(tokenizer(text[:end], add_special_tokens=False).input_ids)


def _position(
    tokenizer, pair: Pair, side: str, ids: Sequence[int], problems: TaskProblems, where: str
) -> int | None:
    """The patched token index on one side ("base"/"source"); adds a problem if it is invalid."""
    text = getattr(pair, side)
    if pair.position == "end":
        return len(ids) - 1
    name = f"{side}_span" if pair.position == "span" else f"{side}_pos"
    if getattr(pair, name) is None:
        problems.add(where, f"missing field {name!r} (position={pair.position!r})")
        return None
    if pair.position == "span":
        span = getattr(pair, f"{side}_span")
        pos = span_position(tokenizer, text, span)
        if pos is None:
            problems.add(where, f"{side}_span {span!r} not found in {side} prompt {text!r}", "span")
        return pos
    pos = getattr(pair, f"{side}_pos")
    if not 0 <= pos < len(ids):
        problems.add(
            where,
            f"{side}_pos {pos} is outside the {side} prompt "
            f"({len(ids)} tokens with BOS, valid 0..{len(ids) - 1})",
            "position",
        )
        return None
    return pos


def _encode_one(
    tokenizer, bos_id: int, pair: Pair, where: str, max_len: int | None = None
) -> EncodedPair | TaskProblems:
    """The encoded pair, or the problems that prevent it."""
    problems = TaskProblems(where)
    if pair.position not in POSITIONS:
        problems.add(where, f"position {pair.position!r} is not one of {POSITIONS}", "position")
        return problems
    words = dict.fromkeys([pair.base_answer, pair.source_answer, pair.label_word])
    for word in words:
        if (message := answer_problem(tokenizer, word)) is not None:
            problems.add(where, message, "answer not one token")
    ids = {s: encode_prompt(tokenizer, bos_id, getattr(pair, s)) for s in ("base", "source")}
    for side in [s for s in ids if max_len is not None and len(ids[s]) > max_len]:
        problems.add(
            where,
            f"{side} prompt is {len(ids[side])} tokens with BOS, longer than the "
            f"model's context of {max_len}",
            "longer than the context",
        )
    pos = {s: _position(tokenizer, pair, s, ids[s], problems, where) for s in ids}
    if problems:
        return problems
    base_a, source_a, label = (
        answer_tokens(tokenizer, w)[0]
        for w in (pair.base_answer, pair.source_answer, pair.label_word)
    )
    _meaningless(pair, ids, pos, base_a == source_a, problems, where)
    if problems:
        return problems
    return EncodedPair(
        base_ids=tuple(ids["base"]),
        source_ids=tuple(ids["source"]),
        base_pos=pos["base"],
        source_pos=pos["source"],
        base_answer=base_a,
        source_answer=source_a,
        label=label,
        pair=pair,
    )


def _meaningless(pair: Pair, ids: dict, pos: dict, same_answer: bool, problems, where) -> None:
    """A pair whose patch cannot change anything, or whose logit difference is always 0."""
    if ids["base"] == ids["source"] and pos["base"] == pos["source"]:
        problems.add(
            where,
            "base and source prompts are identical: patching changes nothing",
            "identical prompts",
        )
    if same_answer:
        problems.add(
            where,
            f"base_answer {pair.base_answer!r} and source_answer "
            f"{pair.source_answer!r} are the same token: the logit difference "
            "between them is 0 on every prompt",
            "identical answers",
        )


def _key(e: EncodedPair) -> tuple:
    return (
        e.base_ids,
        e.source_ids,
        e.base_pos,
        e.source_pos,
        e.base_answer,
        e.source_answer,
        e.label,
    )


def encode(
    pairs: Sequence[Pair],
    tokenizer,
    bos_id: int,
    min_pairs: int = 1,
    drop_invalid: bool = False,
    max_len: int | None = None,
    what: str = "task",
    earlier: TaskProblems | None = None,
) -> list[EncodedPair]:
    """Token ids, patch positions and answer ids of every pair.

    Problems (an answer that is not one token, a position outside the prompt, a span not found,
    a prompt longer than `max_len` tokens, identical base and source prompts or answers, a
    duplicated pair, fewer than `min_pairs` pairs), with the `earlier` ones of records that
    never became pairs, are collected and raised as ONE ConfigError, one line each. With
    `drop_invalid`, bad and duplicated pairs are dropped instead, and ONE WARNING counts them by
    reason; only too few surviving pairs is an error.
    """
    problems, out, seen, n_bad = TaskProblems(what), [], {}, 0
    if earlier is not None:
        problems.extend(earlier)
    n_given = len(pairs) + problems.n_places()
    for i, pair in enumerate(pairs):
        where = pair.origin or f"pair {i + 1}"
        done = _encode_one(tokenizer, bos_id, pair, where, max_len)
        if isinstance(done, TaskProblems):
            problems.extend(done)
            n_bad += 1
        elif (first := seen.setdefault(_key(done), where)) != where:
            problems.add(where, f"duplicate of {first}", "duplicate")
        else:
            out.append(done)
    if drop_invalid and problems:
        logger.warning(
            "%s: dropped %d of %d pair(s) (dataset.invalid=drop), by reason: %s\n%s",
            what,
            n_given - len(out),
            n_given,
            problems.by_reason(),
            problems.message(),
        )
        problems = TaskProblems(what)
    # strict: invalid pairs are reported above, so only distinct pairs count; else valid ones
    n, kind = (len(out), "valid") if drop_invalid else (len(out) + n_bad, "distinct")
    if n < min_pairs:
        problems.add("task", f"only {n} {kind} pair(s) of {n_given}, min_pairs={min_pairs}")
    problems.raise_if_any()
    return out


GROUP_KEYS = ("relation", "template", "group")  # meta keys that name a pair's group, first wins
SHOWN_GROUPS = 8  # groups named in the keep=known line; the rest are summed


def group_of(pair: Pair) -> str:
    """The pair's group for counts: its meta's relation, template or group, else "all"."""
    return next((str(pair.meta[k]) for k in GROUP_KEYS if k in pair.meta), "all")


def cluster_of(pair: Pair) -> str | None:
    """The cluster the bootstrap resamples the pair with: its meta's group, else its relation and
    template (those it has; a fact's pairs share both), else None (a cluster of its own)."""
    keys = ("group",) if "group" in pair.meta else ("relation", "template")
    found = [pair.meta[k] for k in keys if k in pair.meta]
    return json.dumps(found, sort_keys=True) if found else None


def keep_known(
    encoded: Sequence[EncodedPair], predict: Callable[[list[str]], Sequence[int]], what: str
) -> list[EncodedPair]:
    """The pairs whose base answer and source answer the model itself predicts (`predict`:
    prompt texts -> the model's argmax next-token ids); logs how many survived per group."""
    n = len(encoded)
    predicted = list(predict([e.pair.base for e in encoded] + [e.pair.source for e in encoded]))
    if len(predicted) != 2 * n:
        raise ValueError(f"predict gave {len(predicted)} ids for {2 * n} prompts")
    known = [
        predicted[i] == e.base_answer and predicted[n + i] == e.source_answer
        for i, e in enumerate(encoded)
    ]
    kept = [e for e, k in zip(encoded, known, strict=True) if k]
    total, survived = Counter(group_of(e.pair) for e in encoded), Counter()
    survived.update(group_of(e.pair) for e in kept)
    ordered = [g for g, _ in total.most_common()]
    shown, rest = ordered[:SHOWN_GROUPS], ordered[SHOWN_GROUPS:]
    parts = [f"{g} {survived[g]}/{total[g]}" for g in shown]
    if rest:
        k, t = sum(survived[g] for g in rest), sum(total[g] for g in rest)
        parts.append(f"{len(rest)} more groups {k}/{t}")
    logger.info(
        "%s: dataset.keep=known kept %d of %d pair(s) whose base and source answers the model "
        "predicts (per group: %s)",
        what,
        len(kept),
        n,
        ", ".join(parts),
    )
    if not kept:
        raise ConfigError(
            f"{what}: dataset.keep=known kept none of the {n} pair(s): the model predicts the "
            "base and source answers of none of them"
        )
    return kept


def check_splits(
    what: str, splits: dict[str, Sequence], n_valid: int, min_pairs: int, why_dropped: str = ""
) -> None:
    """WARNING for pairs no split got (`why_dropped`); one ConfigError line when a split has
    fewer than `min_pairs` pairs, naming each split's count."""
    counts = {s: len(v) for s, v in splits.items()}
    dropped = n_valid - sum(counts.values())
    if dropped:
        logger.warning(
            "%s: %d of %d valid pair(s) dropped: %s", what, dropped, n_valid, why_dropped
        )
    short = [s for s, n in counts.items() if n < min_pairs]
    if short:
        got = ", ".join(f"{s} {n}" for s, n in counts.items())
        lost = f"; {dropped} dropped: {why_dropped}" if dropped else ""
        raise ConfigError(
            f"{what}: too few pairs in {' and '.join(short)}: dataset.min_pairs={min_pairs} "
            f"applies to each split, which got {got} (of {n_valid} valid pair(s){lost})"
        )


def _prompts(ids, pos, answer, other, pad_id: int) -> PromptBatch:
    tokens, mask, offsets = left_pad(ids, pad_id)
    return PromptBatch(
        tokens=tokens,
        mask=mask,
        pos=torch.tensor(pos) + offsets,
        answer=torch.tensor(answer),
        other=torch.tensor(other),
    )


def collate(encoded: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    """Left-padded base/source prompts; `pos` is the padded column of each patched token.

    LD convention: base answers its own answer vs the source's (base.answer/base.other), the
    source its own vs the base's; `label` is the answer the patched base run should give.
    """
    b_ans, s_ans = [e.base_answer for e in encoded], [e.source_answer for e in encoded]
    base = _prompts(
        [e.base_ids for e in encoded], [e.base_pos for e in encoded], b_ans, s_ans, pad_id
    )
    source = _prompts(
        [e.source_ids for e in encoded], [e.source_pos for e in encoded], s_ans, b_ans, pad_id
    )
    cluster = tuple(cluster_of(e.pair) for e in encoded)
    return PairBatch(base, source, torch.tensor([e.label for e in encoded]), cluster=cluster)


def batches(encoded: Sequence[EncodedPair], batch_size: int, pad_id: int) -> list[PairBatch]:
    """Consecutive chunks of `batch_size` pairs (mixed lengths, left-padded)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    return [collate(c, pad_id) for c in chunks]


def split_keys(keys: Iterable[str], test_fraction: float, seed: int) -> tuple[set, set]:
    """(train, test) sets of keys: a seeded shuffle of the sorted keys; round(n * fraction) test."""
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    ordered = sorted(set(keys))
    random.Random(seed).shuffle(ordered)
    n_test = round(len(ordered) * test_fraction)
    return set(ordered[n_test:]), set(ordered[:n_test])


def _as_keys(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def split_pairs(
    pairs: Sequence[T],
    key: Callable[[T], str | Iterable[str]],
    test_fraction: float = 0.5,
    seed: int = 0,
) -> tuple[list[T], list[T]]:
    """(train, test) pairs (or encoded pairs), split by `key` (e.g. the subjects of a pair): no
    key on both sides.

    `key` gives one key or several; a pair goes to a side only if all its keys are on that side
    (pairs whose keys straddle the split are dropped: the caller counts them). Deterministic
    given `seed`.
    """
    keys = [_as_keys(key(p)) for p in pairs]
    train_keys, _ = split_keys((k for ks in keys for k in ks), test_fraction, seed)
    train = [p for p, ks in zip(pairs, keys, strict=True) if all(k in train_keys for k in ks)]
    test = [p for p, ks in zip(pairs, keys, strict=True) if not any(k in train_keys for k in ks)]
    return train, test
