"""Layers only point down: a short AST scan of every `import` in mlpim (lazy ones included).

Order, low to high: base (errors, constants, files, lock, reuse, options) < engine < tasks <
analysis < report < experiments < top (config, preflight, identity, run, sweep, cli). A module may
import its own layer and those below, with no exception. Besides: engine/ never imports omegaconf
or hydra (it takes plain arguments); tasks/ know no model: of engine/ they import only the batch
types `mlpim.engine.batch`; analysis/ imports neither report/ nor `mlpim.files` (it computes and
returns, and writes no files); no experiment module imports another (`common` is shared, not an
experiment).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mlpim

PACKAGE = Path(mlpim.__file__).resolve().parent
LAYERS = ("base", "engine", "tasks", "analysis", "report", "experiments", "top")
BASE = {"mlpim", "mlpim.errors", "mlpim.constants", "mlpim.files", "mlpim.lock", "mlpim.reuse"}
BASE |= {"mlpim.options"}  # each experiment's typed options (its `extra` config group)
BATCH = "mlpim.engine.batch"  # the one engine module tasks import: the batch types
SHARED_EXPERIMENT_MODULES = {"mlpim.experiments", "mlpim.experiments.common"}


def layer(module: str) -> str:
    """The layer of a module of mlpim, by the rule in this file's docstring."""
    if module in BASE:
        return "base"
    part = module.split(".")[1]
    return part if part in LAYERS else "top"


def imports(path: Path, package: Path) -> list[str]:
    """Every mlpim module `path` imports (`from mlpim.x import y` names mlpim.x.y if a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                rel = Path(*sub.split(".")[1:])
                is_module = (package / rel).is_dir() or (package / rel).with_suffix(".py").exists()
                found.append(sub if sub.startswith("mlpim.") and is_module else node.module)
    return found


def problems(package: Path) -> list[str]:
    """Each import of the tree at `package` (an `mlpim` directory) that breaks a rule."""
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        own = layer(module)
        for target in imports(path, package):
            out += [f"{rel}: {why}" for why in broken(module, own, target)]
    return out


def broken(module: str, own: str, target: str) -> list[str]:
    """The rules `module` (in layer `own`) breaks by importing `target`."""
    top = target.split(".")[0]
    if own == "engine" and top in ("omegaconf", "hydra"):
        return [f"engine imports {target} (it takes plain arguments)"]
    if top != "mlpim":
        return []
    theirs = layer(target)
    if own == "analysis" and (theirs == "report" or target == "mlpim.files"):
        return [f"analysis imports {target} (analysis computes and returns, writes no files)"]
    if own == "tasks" and theirs == "engine" and target != BATCH:
        return [f"tasks imports {target} (tasks know no model; only {BATCH})"]
    if LAYERS.index(theirs) > LAYERS.index(own):
        return [f"{own} imports {target} ({theirs} is a higher layer)"]
    shared = SHARED_EXPERIMENT_MODULES
    if own == theirs == "experiments" and module not in shared and target not in shared:
        return [f"experiment imports another experiment, {target}"]
    return []


def test_layers_only_point_down():
    found = problems(PACKAGE)
    assert not found, "\n".join(found)


FAKE = {  # a file of a fake mlpim tree -> the problem it must raise
    "engine/bad.py": ("from omegaconf import DictConfig\n", "engine imports omegaconf"),
    "engine/up.py": ("from mlpim.tasks import ioi\n", "tasks is a higher layer"),
    "tasks/up.py": ("import mlpim.engine.models\n", "tasks imports mlpim.engine.models"),
    "analysis/up.py": ("from mlpim.experiments import common\n", "higher layer"),
    "analysis/writes.py": ("from mlpim.report import io\n", "writes no files"),
    "analysis/files.py": ("from mlpim.files import atomic_write\n", "writes no files"),
    "analysis/lazy.py": ("def f():\n    from mlpim import sweep\n", "mlpim.sweep"),
    "report/collect.py": ("from mlpim.sweep import read_status\n", "higher layer"),
    "experiments/a.py": ("from mlpim.experiments import b\n", "another experiment"),
}
FINE = {
    "engine/ok.py": "from mlpim.engine.batch import PairBatch\nfrom mlpim.errors import ConfigError\n",
    "tasks/ok.py": "from mlpim.engine.batch import PairBatch\n",
    "analysis/ok.py": "from mlpim.engine import models\nfrom mlpim.tasks import ioi\n",
    "report/ok.py": "from mlpim.analysis import toy\n",
    "experiments/b.py": "from mlpim.experiments.common import model_for\nfrom mlpim.report import io\n",
    "run.py": "from mlpim.experiments import b\n",
}


@pytest.fixture
def fake_tree(tmp_path) -> Path:
    """A small mlpim tree: every module the snippets name, empty, plus the snippets."""
    root = tmp_path / "mlpim"
    for rel in ("engine", "tasks", "analysis", "report", "experiments"):
        (root / rel).mkdir(parents=True)
        (root / rel / "__init__.py").write_text("")
    for rel in ("errors.py", "files.py", "sweep.py", "__init__.py", "engine/batch.py"):
        (root / rel).write_text("")
    for rel in ("tasks/ioi.py", "engine/models.py", "report/io.py", "experiments/common.py"):
        (root / rel).write_text("")
    for rel, text in [*FINE.items(), *((r, t) for r, (t, _) in FAKE.items())]:
        (root / rel).write_text(text)
    return root


def test_the_scan_can_fail(fake_tree):
    """Each rule catches its own snippet; the allowed imports pass."""
    found = problems(fake_tree)
    for rel, (_, needle) in FAKE.items():
        hits = [p for p in found if p.startswith(f"mlpim/{rel}:")]
        assert len(hits) == 1 and needle in hits[0], (rel, found)
    assert len(found) == len(FAKE), found
