"""Helpers of the fault tests (test_faults_*.py): the command line run in this process, the
one-line check, and what is on disk."""

from __future__ import annotations

from pathlib import Path

FAST = [
    "model=tiny",
    "device=cpu",
    "method.epochs=1",
    "dataset.n_train_pairs=8",
    "dataset.n_test_pairs=8",
    "dataset.n_eval_prompts=20",
]
NAMES = ["Mary", "John", "Anna", "Paul", "Sara", "Mark", "Lisa", "Tom", "Emma", "Jack"]
TEMPLATE = "When {} and {} went to the store , {} gave a drink to"


def cli(capsys, *args: str) -> tuple[int, str]:
    """`mlpim ARGS` in this process: (exit code, stdout + stderr)."""
    from mlpim.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def one_line(code: int, out: str, *needles: str, exit: int = 2) -> str:
    """Assert the exit code, no traceback and exactly one `mlpim: ...` line holding `needles`."""
    assert code == exit, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("mlpim: ")]
    assert len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def on_disk(path: Path) -> dict[str, int]:
    """Every file under `path` (hidden ones too) -> its mtime in ns; {} when `path` is absent."""
    path = Path(path)
    if not path.exists():
        return {}
    return {
        p.relative_to(path).as_posix(): p.stat().st_mtime_ns
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def pair_rows(group: bool = True) -> list[dict]:
    """24 IOI-like pairs (the repeated name swapped), grouped by the first name."""
    rows = []
    for i, a in enumerate(NAMES):
        for b in NAMES[i + 1 : i + 4]:
            row = {
                "base": TEMPLATE.format(a, b, b),
                "source": TEMPLATE.format(a, b, a),
                "base_answer": a,
                "source_answer": b,
            }
            rows.append(row | ({"meta": {"group": a}} if group else {}))
    return rows
