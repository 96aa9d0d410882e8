"""MIB-style causal-variable rows -> mlpim pairs, and mlpim's IOI pairs -> MIB-style rows.

The MIB benchmark's causal-variable track (github.com/aaronmueller/MIB,
MIB-causal-variable-track; datasets mib-bench/ioi, mib-bench/arithmetic_addition, mib-bench/ravel,
mib-bench/copycolors_mcqa, mib-bench/arc_easy) stores one row per base prompt:

- `prompt`: the base prompt (every task's `parse_*_example` reads `row["prompt"]`; the loader
  `tasks/hf_dataloader.py` documents `question` as the alternative).
- the answer: `choices` + `answerKey`, an integer index. For MCQA/ARC `choices` is
  {`label`: [symbols], `text`: [...]} and the answer is `choices["label"][answerKey]`
  (tests/test_ARC.py, MIB-circuit-track `MIB_circuit_track/dataset.py`); for IOI `choices` is
  the list of the two names and the answer `choices[answerKey]`, the indirect object, also
  in `metadata.indirect_object` (with `metadata.subject`, `object`, `place`). Arithmetic
  rows carry the answer as `label` (with `num_digit`, `operator`); RAVEL rows carry
  `entity` and `attribute` and no answer field (MIB computes it from its causal model).
- `<type>_counterfactual` columns, each one counterfactual prompt row with the same fields
  (its own `prompt`, `choices`/`answerKey` or `label`), found by the suffix
  (`hf_dataloader.load_hf_dataset`). Types: IOI `s1_io_flip`, `s2_io_flip`,
  `s1_ioi_flip_s2_ioi_flip` (also `abc`, `random_names`, ...); arithmetic `random`,
  `ones_carry`; RAVEL `attribute`, `wikipedia`; MCQA/ARC `answerPosition`, `randomLetter`,
  `answerPosition_randomLetter`, `symbol`.

A pair is (base = the row, source = its counterfactual of the chosen type), patched at the last
token. MIB's expected output of an interchange intervention comes from its causal models, which
mlpim does not run: a pair's label is the source's answer unless the counterfactual row has
`patched_answer` (an mlpim extension, written by `ioi_mib_rows`). Rows are read from JSONL (or a
JSON list) or from a Hugging Face `datasets` folder written by `save_to_disk`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mlpim.errors import MlpimError
from mlpim.tasks.pairs import Pair, read_text

logger = logging.getLogger(__name__)

SUFFIX = "_counterfactual"
PROMPT_FIELDS = ("prompt", "question", "input")
SHOWN_ROWS = 5  # row numbers named per reason in a refusal


def counterfactual_types(rows: Sequence[dict]) -> list[str]:
    """The counterfactual types (`<type>` of `<type>_counterfactual` columns) the rows hold."""
    names = {k for row in rows for k in row if isinstance(k, str) and k.endswith(SUFFIX)}
    return sorted(n[: -len(SUFFIX)] for n in names)


def _column(counterfactual: str, rows: Sequence[dict]) -> str:
    """The column of a counterfactual type (given with or without the suffix), or a refusal."""
    column = counterfactual if counterfactual.endswith(SUFFIX) else counterfactual + SUFFIX
    available = counterfactual_types(rows)
    if column[: -len(SUFFIX)] not in available:
        found = ", ".join(available) or "none"
        raise MlpimError(
            f"counterfactual {counterfactual!r} is not in the rows; available: {found}"
        )
    return column


def _only_type(rows: Sequence[dict]) -> str:
    """The one counterfactual type of the rows; a refusal listing them when there are several."""
    types = counterfactual_types(rows)
    if len(types) == 1:
        return types[0]
    found = ", ".join(types) or "none"
    raise MlpimError(
        f"choose the counterfactual with dataset.counterfactual=: the rows hold {found}"
    )


def _dotted(row: dict, path: str) -> Any:
    """row["a"]["b"] for path "a.b"; None when a step is missing."""
    value: Any = row
    for step in path.split("."):
        value = value.get(step) if isinstance(value, dict) else None
    return value


def _choice(row: dict) -> str | None:
    """choices[answerKey] (IOI) or choices["label"][answerKey] (MCQA, ARC); None if absent."""
    choices, key = row.get("choices"), row.get("answerKey")
    labels = choices.get("label") if isinstance(choices, dict) else choices
    if not isinstance(labels, list) or key is None:
        return None
    if isinstance(key, str) and key in labels:
        return key
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(labels):
        return str(labels[key])
    return None


def answer_of(row: dict, answer_field: str | None = None) -> str | None:
    """A MIB row's answer word: `answer_field` (a dotted path), else choices + answerKey, else
    `label`, else `answer`; None when the row has none of them."""
    if answer_field is not None:
        value = _dotted(row, answer_field)
    elif (value := _choice(row)) is None:
        value = next((row[k] for k in ("label", "answer") if row.get(k) is not None), None)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)


def prompt_of(row: dict, prompt_field: str | None = None) -> str | None:
    """A MIB row's prompt: `prompt_field`, else the first of PROMPT_FIELDS it has."""
    fields = (prompt_field,) if prompt_field else PROMPT_FIELDS
    value = next((row[f] for f in fields if isinstance(row.get(f), str)), None)
    return value if value else None


def _sources(row: dict, column: str) -> list[dict] | str:
    """The counterfactual rows of one base row (a list is several), or why there are none."""
    value = row.get(column)
    rows = value if isinstance(value, list) else [value]
    if not rows or any(not isinstance(r, dict) for r in rows):
        return f"no {column}"
    return rows


def _meta(row: dict, index: int, counterfactual: str) -> dict:
    """The pair's meta: where it came from, plus the row's JSON-able template and metadata."""
    meta = {"mib_row": index, "counterfactual": counterfactual}
    for key in ("template", "metadata"):
        try:
            if row.get(key) is not None and json.dumps(row[key]):
                meta[key] = row[key]
        except (TypeError, ValueError):
            continue
    return meta


def _pair(base: dict, source: dict, opts: dict, meta: dict) -> dict | str:
    """One mlpim pair dict (pairs.py JSONL schema), or the reason it cannot be made."""
    texts = [prompt_of(r, opts["prompt_field"]) for r in (base, source)]
    answers = [answer_of(r, opts["answer_field"]) for r in (base, source)]
    if None in texts:
        return "no prompt"
    if None in answers:
        return "no answer"
    pair = dict(base=texts[0], source=texts[1], base_answer=answers[0], source_answer=answers[1])
    pair["meta"] = dict(meta)
    if isinstance(source.get("patched_answer"), str):
        pair["label"] = source["patched_answer"]
    return pair


def _refusal(problems: dict[str, list[int]], n_rows: int) -> str:
    """One line: how many rows cannot be paired, by reason, with the first row numbers."""
    parts = []
    for reason, rows in problems.items():
        shown = ", ".join(map(str, rows[:SHOWN_ROWS])) + (", ..." if len(rows) > SHOWN_ROWS else "")
        parts.append(f"{reason} ({len(rows)}: row {shown})")
    bad = len({r for rows in problems.values() for r in rows})
    return f"{bad} of {n_rows} MIB rows cannot be paired: {'; '.join(parts)}"


def mib_pairs(
    rows: Iterable[dict],
    counterfactual: str | None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    drop_invalid: bool = False,
    problems=None,
) -> list[dict]:
    """mlpim pair dicts (pairs.py's JSONL schema) from MIB rows and one counterfactual type
    (None: the only one the rows hold).

    Rows are numbered from 0. A row that cannot be paired (no such counterfactual, no prompt,
    no answer) is an error, in one line by reason; `drop_invalid` drops and logs them instead;
    given a `problems` collector (`pairs.TaskProblems`), they are added to it, one per row.
    """
    rows = list(rows)
    column = _column(_only_type(rows) if counterfactual is None else counterfactual, rows)
    opts = {"prompt_field": prompt_field, "answer_field": answer_field}
    collector, pairs, problems = problems, [], {}
    for i, row in enumerate(rows):
        sources = _sources(row, column)
        meta = _meta(row, i, column[: -len(SUFFIX)])
        made = (
            [sources] if isinstance(sources, str) else [_pair(row, s, opts, meta) for s in sources]
        )
        for pair in made:
            if isinstance(pair, str):
                problems.setdefault(pair, []).append(i)
            else:
                pairs.append(pair)
    if collector is not None:
        for reason, where in problems.items():
            for i in dict.fromkeys(where):
                collector.add(f"row {i}", f"cannot be paired: {reason}", reason)
    elif problems and not drop_invalid:
        raise MlpimError(_refusal(problems, len(rows)) + "; drop them with dataset.invalid=drop")
    elif problems:
        logger.warning("dropped: %s", _refusal(problems, len(rows)))
    return pairs


def _jsonl_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file (or of a file holding one JSON list of objects)."""
    text = read_text(path)
    if not text.strip():
        raise MlpimError(f"{path} is empty: no MIB rows")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise MlpimError(f"{path}: not valid JSON ({e})") from e
        lines = list(enumerate(rows, start=1))
    else:
        lines, bad = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            try:
                lines += [(n, json.loads(line))] if line.strip() else []
            except ValueError:
                bad.append(n)
        if bad:
            raise MlpimError(f"{path}: {len(bad)} line(s) are not valid JSON: {bad[:SHOWN_ROWS]}")
    not_objects = [n for n, row in lines if not isinstance(row, dict)]
    if not_objects:
        raise MlpimError(f"{path}: entries {not_objects[:SHOWN_ROWS]} are not JSON objects")
    return [row for _, row in lines]


def _disk_rows(path: Path, split: str | None) -> list[dict]:
    """Rows of a Hugging Face `datasets` folder written by `save_to_disk`."""
    from datasets import DatasetDict, load_from_disk  # slow import: only for such a folder

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise MlpimError(f"{path}: not a dataset saved with save_to_disk ({e})") from e
    if isinstance(loaded, DatasetDict):
        if split is None and len(loaded) != 1:
            raise MlpimError(f"{path} holds splits {sorted(loaded)}; choose one with split=")
        if split is not None and split not in loaded:
            raise MlpimError(f"{path}: no split {split!r}; it holds {sorted(loaded)}")
        loaded = loaded[split if split is not None else next(iter(loaded))]
    elif split is not None:
        raise MlpimError(f"{path} is one dataset without splits; split={split!r} does not apply")
    return [dict(row) for row in loaded]


def read_mib_rows(path: str | Path, split: str | None = None) -> list[dict]:
    """MIB rows from a JSONL file or a `save_to_disk` folder (`split` for a DatasetDict)."""
    path = Path(path)
    if path.is_dir():
        return _disk_rows(path, split)
    if not path.is_file():
        raise MlpimError(f"{path}: no such file or folder")
    if split is not None:
        raise MlpimError(f"{path} is a JSON file; split={split!r} applies to dataset folders")
    return _jsonl_rows(path)


def _word(tokenizer, token) -> str:
    return tokenizer.decode([int(token)]).strip()


def _ioi_row(batch, i: int, tokenizer) -> dict:
    """One IOI prompt as a MIB IOI row: prompt, choices [IO, S], answerKey 0, metadata."""
    io, s = _word(tokenizer, batch.answer[i]), _word(tokenizer, batch.other[i])
    meta = {"indirect_object": io, "subject": s, "pattern": batch.pattern[i]}
    meta["template_index"] = int(batch.template[i])
    return {"prompt": batch.text[i], "choices": [io, s], "answerKey": 0, "metadata": meta}


def ioi_mib_rows(batches: Sequence, tokenizer, counterfactual: str = "s2_io_flip") -> list[dict]:
    """MIB-style rows from mlpim IOI pair batches: the base prompt's row with the source as its
    `<counterfactual>_counterfactual`, and the patched label as `patched_answer` when it is not
    the source's answer.

    Refuses a pair that mlpim's pair format cannot score like IOI: the format's logit difference
    is base answer vs source answer, so the source's IO must be the base's S and vice versa
    (true of S2 flips such as ABB->ABA; not of ABB->BAB, whose two answers are the same name).
    """
    rows = []
    for batch in batches:
        b, s = batch.base, batch.source
        for i in range(len(batch)):
            if not (int(b.other[i]) == int(s.answer[i]) and int(s.other[i]) == int(b.answer[i])):
                combo = f"{b.pattern[i]}->{s.pattern[i]}"
                why = "source IO and S are not the base's S and IO"
                raise MlpimError(f"IOI pair {combo}: {why}; the pair format cannot score it")
            source = _ioi_row(s, i, tokenizer)
            label = _word(tokenizer, batch.label[i])
            if label != source["choices"][0]:
                source["patched_answer"] = label
            rows.append({**_ioi_row(b, i, tokenizer), counterfactual + SUFFIX: source})
    return rows


def write_mib_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """Write MIB rows one JSON object per line (readable by `read_mib_rows`)."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    Path(path).write_text("".join(line + "\n" for line in lines))


def check_mib_task(path: str | Path, counterfactual: str | None, split: str | None) -> None:
    """The MIB rows are readable and hold the counterfactual type (one `MlpimError` line)."""
    rows = read_mib_rows(path, split)
    try:
        _column(_only_type(rows) if counterfactual is None else counterfactual, rows)
    except MlpimError as e:
        raise MlpimError(f"{path}: {e}") from None


def mib_task(path: str | Path, counterfactual: str | None, split: str | None, problems) -> list:
    """The `pairs.Pair`s of a MIB-style task (JSONL file or `save_to_disk` folder) for one
    counterfactual type; rows that cannot be paired are added to `problems` (`TaskProblems`)."""
    made = mib_pairs(read_mib_rows(path, split), counterfactual, problems=problems)
    return [Pair(**d, origin=f"row {d['meta']['mib_row']}") for d in made]
