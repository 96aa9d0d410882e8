"""Tasks: counterfactual pairs for the engine. IOI, the fact set, or a user's JSONL file.

`task_splits` is the one entry point the experiments use: it returns left-padded `PairBatch`es
per split for whichever task `dataset.name` names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from mlpim.engine.batch import PairBatch
from mlpim.errors import ConfigError
from mlpim.tasks import pairs as P
from mlpim.tasks.facts import fact_task, load_facts
from mlpim.tasks.ioi import paper_pairs
from mlpim.tasks.mib import mib_task
from mlpim.tasks.tokenizer import bos_id, ioi_vocabulary, pad_id

TASKS = ("ioi", "pairs", "facts", "mib")
FILE_TASKS = ("pairs", "mib")  # pairs read from a user's file: dataset.invalid and dataset.keep
IOI_ONLY = "this experiment is IOI-specific (name movers, IOI patterns); use dataset=ioi"

Predict = Callable[[list[str]], Sequence[int]]  # prompt texts -> the model's argmax token ids


def task_splits(
    tokenizer, dataset, seed: int, predict: Predict | None = None, n_ctx: int | None = None
) -> dict[str, list[PairBatch]]:
    """Train and test pair batches of the configured task (`predict`, the model's argmax, keeps
    known facts, and the pairs the model gets right with dataset.keep=known; a pair longer than
    `n_ctx` tokens, the model's context, is a problem of the task)."""
    if dataset.name == "ioi":
        return {s: paper_pairs(tokenizer, dataset, s, seed) for s in ("train", "test")}
    if dataset.name in FILE_TASKS:
        return _file_splits(tokenizer, dataset, seed, predict, n_ctx)
    if dataset.name == "facts":
        return _fact_splits(tokenizer, dataset, seed, predict, n_ctx)
    raise ConfigError(f"unknown dataset {dataset.name!r}; allowed: {', '.join(TASKS)}")


def _file_splits(tokenizer, dataset, seed: int, predict: Predict | None, n_ctx: int | None):
    """The whole file validated in one pass (every problem, with its line or row; with
    dataset.invalid=drop the invalid pairs dropped and counted by reason), the pairs the model
    gets right kept (dataset.keep=known), then split."""
    what = f"task file {dataset.path}" if dataset.name == "pairs" else f"MIB task {dataset.path}"
    problems = P.TaskProblems(what)
    rows = _file_pairs(dataset, problems)
    drop = dataset.get("invalid", "error") == "drop"
    bos = bos_id(tokenizer)
    encoded = P.encode(
        rows,
        tokenizer,
        bos,
        min_pairs=0,
        drop_invalid=drop,
        max_len=n_ctx,
        what=what,
        earlier=problems,
    )
    if dataset.get("keep", "all") == "known":
        if predict is None:
            raise ValueError("dataset.keep=known needs the model's predictions (predict)")
        encoded = P.keep_known(encoded, predict, what)
    train, test = P.split_pairs(encoded, lambda e: _pair_key(e.pair), dataset.test_fraction, seed)
    splits = {"train": train, "test": test}
    grouped = all("group" in e.pair.meta for e in encoded)
    why = "their keys straddle the train/test split" + (
        ""
        if grouped
        else " (pairs without meta.group are split by their prompts; give each "
        "pair a meta.group to split by group)"
    )
    P.check_splits(what, splits, len(encoded), dataset.min_pairs, why)
    return {s: P.batches(e, dataset.batch_size, pad_id(tokenizer)) for s, e in splits.items()}


def _file_pairs(dataset, problems) -> list:
    """The `Pair`s of a pairs JSONL file or a MIB-style task; bad records go to `problems`."""
    if dataset.name == "pairs":
        return P.read_jsonl(dataset.path, problems)
    return mib_task(dataset.path, dataset.get("counterfactual"), dataset.get("split"), problems)


def _pair_key(pair) -> tuple[str, ...]:
    """Pairs are split by their base and source prompts (or `meta.group` when given)."""
    group = pair.meta.get("group")
    return (str(group),) if group is not None else (pair.base, pair.source)


def _fact_splits(tokenizer, dataset, seed: int, predict: Predict | None, n_ctx: int | None):
    return fact_task(tokenizer, dataset, seed, predict, n_ctx).batches


def task_vocabulary(dataset) -> list[str]:
    """Every word of the task, for the tiny test models' word-level tokenizer."""
    if dataset.name == "ioi":
        return ioi_vocabulary(dataset)
    if dataset.name == "facts":
        texts = [t for f in load_facts(dataset.path) for t in (f.prompt, f.attribute)]
    else:
        ignored = P.TaskProblems("vocabulary")  # the task's own reading reports them
        texts = [
            t
            for p in _file_pairs(dataset, ignored)
            for t in (p.base, p.source, p.base_answer, p.source_answer)
        ]
    words = [w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)]
    return list(dict.fromkeys(words))
