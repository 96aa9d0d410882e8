"""Helpers shared by the test files: the tiny-model overrides, the command line run in this
process (`cli`) or as a subprocess (`mlpim_process`), the one-line error check, and what is on
disk. The thread setting is made once, in conftest.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mlpim.engine.batch import PairBatch
from mlpim.engine.models import hook_name
from mlpim.engine.patching import logits_end

TINY = ["model=tiny", "device=cpu"]
# a run in seconds: 1 DAS epoch, 20 pairs per split, 20 prompts per split for the clean baseline
FAST = [
    *TINY,
    "method.epochs=1",
    "dataset.n_train_pairs=20",
    "dataset.n_test_pairs=20",
    "dataset.n_eval_prompts=20",
]
PROBE = [*FAST, "dataset.n_train_pairs=8", "dataset.n_test_pairs=8"]  # fault probes
SMALL = [*TINY, "dataset.n_train_pairs=40", "dataset.n_test_pairs=20"]  # default DAS epochs
NAMES = ["Mary", "John", "Anna", "Paul", "Sara", "Mark", "Lisa", "Tom", "Emma", "Jack"]
TEMPLATE = "When {} and {} went to the store , {} gave a drink to"
# illusion_check's references, as few as still measure each check (tiny model)
REFS = [
    "extra.random_mlp_seeds=1",
    "extra.random_mlp_epochs=1",
    "extra.n_random_directions=4",
    "extra.n_natural=2",
    "extra.n_random=50",
]


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


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without HYDRA_FULL_ERROR, one thread (tiny models; shared cores), `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def mlpim_process(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, code: str | None = None
) -> subprocess.CompletedProcess:
    """`python -m mlpim ARGS` (or `python -c CODE ARGS`) in `cwd`, so that Hydra's default
    outputs/ lands there; `env` defaults to `subprocess_env()`."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "mlpim"]
    return subprocess.run(
        [*cmd, *args],
        cwd=cwd,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def outcome(proc: subprocess.CompletedProcess) -> tuple[int, str]:
    """A subprocess's (exit code, stdout + stderr), as `cli` returns them."""
    return proc.returncode, proc.stdout + proc.stderr


def assert_one_line_error(
    code: int, out: str, *needles: str, exit: int = 2, prefix: str = "mlpim: "
) -> str:
    """Assert the exit code, no traceback and exactly one line starting with `prefix`, holding
    `needles`; returns that line."""
    assert code == exit, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """`rows` as a JSONL file at `path`, one JSON object a line; returns `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` with `options` (e.g. `size=32k`, `ro,size=64k`) for the block;
    the test is skipped where this process may not mount one (not root)."""
    import pytest

    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# ---------------------------------------------------------------- pairs with an effect in a random model


def end_token_pairs(model, pb: PairBatch) -> PairBatch:
    """Pairs whose prompts differ only in the END token (the source ends in the IO name): the
    variable is present at END even in a random model. Answer: the base prompt's top token;
    other: its bottom token (a clean LD well above 0)."""
    b = pb.base
    with torch.no_grad():
        logits = logits_end(model, b)
    ans, other = logits.argmax(-1), logits.argmin(-1)
    tokens = b.tokens.clone()
    tokens[:, -1] = b.answer
    base = dataclasses.replace(b, answer=ans, other=other)
    return PairBatch(base, dataclasses.replace(base, tokens=tokens), other)


def ld_gradient(model, pairs: list[PairBatch], layer: int) -> torch.Tensor:
    """Mean over the base prompts of ∂LD/∂resid_post[END] at `layer`."""
    grads = []
    for pb in pairs:
        b = pb.base
        delta = torch.zeros(len(b), model.cfg.d_model, requires_grad=True)
        hook = (hook_name("resid_post", layer), _adder(delta))
        with torch.enable_grad():
            logits = model.run_with_hooks(b.tokens, attention_mask=b.mask, fwd_hooks=[hook])
            end = logits[:, -1]
            ld = end.gather(1, b.answer[:, None]) - end.gather(1, b.other[:, None])
            grads.append(torch.autograd.grad(ld.sum(), delta)[0])
    return torch.cat(grads).mean(0)


def _adder(delta: torch.Tensor):
    def add(act, hook=None):
        act = act.clone()
        act[:, -1] = act[:, -1] + delta
        return act

    return add
