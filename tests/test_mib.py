"""MIB-style causal-variable rows (JSONL and save_to_disk folders) -> mlpim pairs, and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mlpim.errors import MlpimError
from mlpim.tasks import bos_id, pad_id
from mlpim.tasks.ioi import make_pairs
from mlpim.tasks.mib import (
    counterfactual_types,
    ioi_mib_rows,
    mib_pairs,
    read_mib_rows,
    write_mib_jsonl,
)
from mlpim.tasks.pairs import Pair, collate, encode
from mlpim.tasks.tokenizer import ioi_vocabulary, word_tokenizer

CONF = Path(__file__).resolve().parents[1] / "mlpim" / "conf" / "dataset" / "ioi.yaml"


def ioi_row(prompt: str, io: str, s: str, **cfs) -> dict:
    """A row shaped like mib-bench/ioi: choices [IO, S], answerKey 0, metadata."""
    meta = {"subject": s, "indirect_object": io, "object": "drink", "place": "store"}
    row = {"prompt": prompt, "choices": [io, s], "answerKey": 0, "metadata": meta}
    return row | {f"{k}_counterfactual": v for k, v in cfs.items()}


ROWS = [
    ioi_row(
        "When Mary and John went to the store, John gave a drink to",
        "Mary",
        "John",
        s2_io_flip=ioi_row(
            "When Mary and John went to the store, Mary gave a drink to", "John", "Mary"
        ),
        s1_io_flip=ioi_row(
            "When John and Mary went to the store, John gave a drink to", "Mary", "John"
        ),
    ),
    ioi_row(
        "When Alice and Bob went to the store, Bob gave a drink to",
        "Alice",
        "Bob",
        s2_io_flip=ioi_row(
            "When Alice and Bob went to the store, Alice gave a drink to", "Bob", "Alice"
        ),
    ),
]


def test_counterfactual_is_chosen_by_type():
    assert counterfactual_types(ROWS) == ["s1_io_flip", "s2_io_flip"]
    pairs = mib_pairs(ROWS, "s2_io_flip")
    assert [(p["base_answer"], p["source_answer"]) for p in pairs] == [
        ("Mary", "John"),
        ("Alice", "Bob"),
    ]
    assert pairs[0]["source"] == ROWS[0]["s2_io_flip_counterfactual"]["prompt"]
    assert pairs[0]["meta"]["mib_row"] == 0 and pairs[0]["meta"]["counterfactual"] == "s2_io_flip"
    assert mib_pairs(ROWS, "s2_io_flip_counterfactual") == pairs
    Pair(**pairs[0])  # the pairs.py schema


def test_missing_counterfactual_type_lists_the_available_ones():
    with pytest.raises(MlpimError) as e:
        mib_pairs(ROWS, "abc")
    assert (
        str(e.value) == "counterfactual 'abc' is not in the rows; available: s1_io_flip, s2_io_flip"
    )


def test_rows_without_the_counterfactual_are_counted_or_dropped(caplog):
    with pytest.raises(MlpimError) as e:
        mib_pairs(ROWS, "s1_io_flip")
    message = str(e.value)
    assert "\n" not in message
    assert "1 of 2 MIB rows cannot be paired: no s1_io_flip_counterfactual (1: row 1)" in message
    kept = mib_pairs(ROWS, "s1_io_flip", drop_invalid=True)
    assert len(kept) == 1 and kept[0]["meta"]["mib_row"] == 0
    assert "no s1_io_flip_counterfactual" in caplog.text


def test_other_mib_answer_layouts():
    mcqa = {
        "prompt": "Q? A. red B. blue Answer:",
        "choices": {"label": ["A", "B"], "text": ["red", "blue"]},
        "answerKey": 1,
        "answerPosition_counterfactual": {
            "prompt": "Q? A. blue B. red Answer:",
            "choices": {"label": ["A", "B"], "text": ["blue", "red"]},
            "answerKey": 0,
        },
    }
    arithmetic = {
        "prompt": "Q: How much is 12 plus 30? A:",
        "label": 42,
        "num_digit": 2,
        "random_counterfactual": {"prompt": "Q: How much is 11 plus 20? A:", "label": 31},
    }
    ravel = {
        "prompt": "Paris is a city in the country of",
        "entity": "Paris",
        "attribute": "Country",
        "attribute_counterfactual": {
            "prompt": "Tokyo is a city in the country of",
            "entity": "Tokyo",
        },
    }
    (p,) = mib_pairs([mcqa], "answerPosition")
    assert (p["base_answer"], p["source_answer"]) == ("B", "A")
    (p,) = mib_pairs([arithmetic], "random")
    assert (p["base_answer"], p["source_answer"]) == ("42", "31")
    with pytest.raises(MlpimError) as e:
        mib_pairs([ravel], "attribute")
    assert "no answer" in str(e.value)
    (p,) = mib_pairs([ravel], "attribute", answer_field="entity")
    assert p["source_answer"] == "Tokyo"


def test_jsonl_and_save_to_disk_give_the_same_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_mib_jsonl(ROWS, tmp_path / "ioi.jsonl")
    from_jsonl = mib_pairs(read_mib_rows(tmp_path / "ioi.jsonl"), "s2_io_flip")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    from_disk = mib_pairs(read_mib_rows(tmp_path / "one"), "s2_io_flip")
    strip = [{k: v for k, v in p.items() if k != "meta"} for p in from_jsonl]
    assert [{k: v for k, v in p.items() if k != "meta"} for p in from_disk] == strip
    assert from_jsonl == mib_pairs(ROWS, "s2_io_flip")
    split = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:1]),
            "test": datasets.Dataset.from_list(ROWS[1:]),
        }
    )
    split.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(MlpimError) as e:
        read_mib_rows(tmp_path / "splits")
    assert "choose one with split=" in str(e.value) and "'test', 'train'" in str(e.value)
    (test_pair,) = mib_pairs(read_mib_rows(tmp_path / "splits", split="test"), "s2_io_flip")
    assert test_pair["base_answer"] == "Alice"


def test_unreadable_row_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n[1]\n')
    with pytest.raises(MlpimError) as e:
        read_mib_rows(tmp_path / "bad.jsonl")
    assert "not valid JSON: [2]" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlpimError) as e:
        read_mib_rows(tmp_path / "empty")
    assert "save_to_disk" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def ioi():
    cfg = OmegaConf.load(CONF)
    return cfg, word_tokenizer(ioi_vocabulary(cfg))


def _unpadded(prompts, i: int) -> list[int]:
    return prompts.tokens[i][prompts.mask[i].bool()].tolist()


def test_mlpim_ioi_pairs_round_trip_through_a_mib_file(tmp_path, ioi):
    cfg, tok = ioi
    combos = [("ABB", "ABA"), ("BAB", "BAA"), ("ABB", "BAA")]  # S2 flips, and a position flip
    batches = make_pairs(tok, cfg, "test", combos, 4, seed=0)
    write_mib_jsonl(ioi_mib_rows(batches, tok), tmp_path / "ioi_mib.jsonl")
    pairs = [Pair(**d) for d in mib_pairs(read_mib_rows(tmp_path / "ioi_mib.jsonl"), "s2_io_flip")]
    encoded = encode(pairs, tok, bos_id(tok))
    originals = [(b, i) for b in batches for i in range(len(b))]
    assert len(encoded) == len(originals) == 12
    again = collate(encoded, pad_id(tok))
    for j, (batch, i) in enumerate(originals):
        assert list(encoded[j].base_ids) == _unpadded(batch.base, i)
        assert list(encoded[j].source_ids) == _unpadded(batch.source, i)
        for side in ("base", "source"):
            ours, theirs = getattr(again, side), getattr(batch, side)
            assert (int(ours.answer[j]), int(ours.other[j])) == (
                int(theirs.answer[i]),
                int(theirs.other[i]),
            )
        assert int(again.label[j]) == int(batch.label[i])
    assert any("label" in p.to_json() for p in pairs)  # ABB->BAA: the label is the base's IO


def test_ioi_pairs_the_format_cannot_score_are_refused(ioi):
    cfg, tok = ioi
    batches = make_pairs(tok, cfg, "test", [("ABB", "BAB")], 2, seed=0)
    with pytest.raises(MlpimError) as e:
        ioi_mib_rows(batches, tok)
    assert "ABB->BAB" in str(e.value)


def test_written_rows_look_like_mib_ioi(tmp_path, ioi):
    cfg, tok = ioi
    rows = ioi_mib_rows(make_pairs(tok, cfg, "test", [("ABB", "ABA")], 1, seed=0), tok)
    write_mib_jsonl(rows, tmp_path / "r.jsonl")
    (row,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    cf = row["s2_io_flip_counterfactual"]
    assert row["choices"][row["answerKey"]] == row["metadata"]["indirect_object"]
    assert cf["choices"][cf["answerKey"]] == row["metadata"]["subject"]
    assert "patched_answer" not in cf
