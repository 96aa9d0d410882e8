"""Tasks: counterfactual pairs for the engine. IOI, the fact set, or a user's JSONL file.

`task_splits` is the one entry point the experiments use: it returns left-padded `PairBatch`es
per split for whichever task `dataset.name` names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mlpim.tasks.batch import PairBatch

TASKS = ("ioi", "pairs", "facts")
IOI_ONLY = "this experiment is IOI-specific (name movers, IOI patterns); use dataset=ioi"

Predict = Callable[[list[str]], Sequence[int]]  # prompt texts -> the model's argmax token ids


def bos_id(tokenizer) -> int:
    """The id every prompt starts with (the tokenizer's BOS, else EOS)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    """Padding is masked out; the tokenizer's own pad id when it has one."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else bos_id(tokenizer)


def task_splits(
    tokenizer, dataset, seed: int, predict: Predict | None = None
) -> dict[str, list[PairBatch]]:
    """Train and test pair batches of the configured task (`predict` keeps known facts)."""
    if dataset.name == "ioi":
        from mlpim.tasks.ioi import paper_pairs

        return {s: paper_pairs(tokenizer, dataset, s, seed) for s in ("train", "test")}
    if dataset.name == "pairs":
        return _jsonl_splits(tokenizer, dataset, seed)
    if dataset.name == "facts":
        return _fact_splits(tokenizer, dataset, seed, predict)
    from mlpim.engine.models import ConfigError

    raise ConfigError(f"unknown dataset {dataset.name!r}; allowed: {', '.join(TASKS)}")


def _jsonl_splits(tokenizer, dataset, seed: int) -> dict[str, list[PairBatch]]:
    from mlpim.tasks import pairs as P

    rows = P.read_jsonl(dataset.path)
    train, test = P.split_pairs(rows, _pair_key, dataset.test_fraction, seed)
    out = {}
    for split, chosen in (("train", train), ("test", test)):
        encoded = P.encode(chosen, tokenizer, bos_id(tokenizer), min_pairs=dataset.min_pairs)
        out[split] = P.batches(encoded, dataset.batch_size, pad_id(tokenizer))
    return out


def _pair_key(pair) -> tuple[str, ...]:
    """Pairs are split by their base and source prompts (or `meta.group` when given)."""
    group = pair.meta.get("group")
    return (str(group),) if group is not None else (pair.base, pair.source)


def _fact_splits(tokenizer, dataset, seed: int, predict: Predict | None):
    from mlpim.tasks.facts import fact_task

    return fact_task(tokenizer, dataset, seed, predict).batches


def task_vocabulary(dataset) -> list[str]:
    """Every word of the task, for the tiny test models' word-level tokenizer."""
    import re

    from mlpim.tasks.tokenizer import ioi_vocabulary

    if dataset.name == "ioi":
        return ioi_vocabulary(dataset)
    if dataset.name == "facts":
        from mlpim.tasks.facts import load_facts

        texts = [t for f in load_facts(dataset.path) for t in (f.prompt, f.attribute)]
    else:
        from mlpim.tasks.pairs import read_jsonl

        texts = [t for p in read_jsonl(dataset.path)
                 for t in (p.base, p.source, p.base_answer, p.source_answer)]  # fmt: skip
    words = [w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)]
    return list(dict.fromkeys(words))
