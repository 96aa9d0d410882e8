"""Write mlpim/tasks/data/pronouns.jsonl: the bundled pronoun task (`dataset=pronouns`).

A binary attribute variable, unlike IOI's positions and the fact set's entities: the subject's
grammatical gender, patched at the name's token (`base_span`/`source_span`), answered at END where
the model predicts " he" or " she" (at END itself SmolLM2's residual hardly carries it at layer
20: its later layers read the name back by attention). Each pair swaps a male and a female first
name in one template; meta.group is the template, so the test split holds out whole templates. Deterministic (seed 0): re-running it rewrites the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEMPLATES = [
    "{} was late for work because",
    "{} went to the store because",
    "{} called the doctor because",
    "{} could not sleep last night because",
    "{} missed the bus, so",
    "{} opened the letter and",
    "{} loves to cook, and",
    "When {} got home,",
    "After {} finished the exam,",
    "{} looked at the sky and",
]
MALE = [
    "John",
    "David",
    "Michael",
    "James",
    "Robert",
    "Thomas",
    "Daniel",
    "Paul",
    "Mark",
    "Peter",
    "George",
    "Richard",
    "Steven",
    "Kevin",
    "Brian",
    "Frank",
]
FEMALE = [
    "Mary",
    "Sarah",
    "Emily",
    "Anna",
    "Lisa",
    "Laura",
    "Emma",
    "Jessica",
    "Rachel",
    "Susan",
    "Linda",
    "Karen",
    "Julia",
    "Alice",
    "Helen",
    "Nancy",
]
PAIRS_PER_TEMPLATE = 16
OUT = Path(__file__).resolve().parents[1] / "mlpim" / "tasks" / "data" / "pronouns.jsonl"


def pairs(rng: random.Random) -> list[dict]:
    """Per template, distinct name pairs: half male base → female source, half the other way."""
    out = []
    for g, t in enumerate(TEMPLATES):
        names = rng.sample([(m, f) for m in MALE for f in FEMALE], PAIRS_PER_TEMPLATE)
        for i, (m, f) in enumerate(names):
            (b, ba), (s, sa) = ((m, "he"), (f, "she")) if i % 2 == 0 else ((f, "she"), (m, "he"))
            out.append(
                {
                    "base": t.format(b),
                    "source": t.format(s),
                    "base_answer": ba,
                    "source_answer": sa,
                    "base_span": b,
                    "source_span": s,
                    "meta": {"group": f"template {g}"},
                }
            )
    return out


if __name__ == "__main__":
    rows = pairs(random.Random(0))
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} pairs -> {OUT}")
