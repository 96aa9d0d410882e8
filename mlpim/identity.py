"""What identifies a run besides its config: the code that made it and the files it read.

`code_version()` is mlpim's version, the git commit of its checkout, whether mlpim's files differ
from that commit, and `code_hash`, a hash of mlpim's own files (its modules, configs and bundled
data): what a later run compares, since a commit alone cannot tell two dirty trees apart.
`input_hashes(cfg)` is the SHA-256 of every file the config names for the run to read.
`identity_changes(done, cfg)` says, in words, what differs from a finished run's `DONE`.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

from omegaconf import DictConfig

from mlpim import __version__
from mlpim.experiments import get_experiment, runner_names

PACKAGE = Path(__file__).resolve().parent
CODE_SUFFIXES = (".py", ".yaml", ".jsonl")  # what mlpim runs and reads from its own tree
FILE_OPTIONS = (
    "direction",
    "dataset.path",
    "model.file",
)  # any run may read; and `Experiment.inputs`


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the checkout mlpim is imported from, when it is a git checkout."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether mlpim's own files differ from that commit (None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=all", "--", ".")
    return None if status is None else bool(status)


def code_files() -> list[Path]:
    """mlpim's own files that make its results: modules, configs, bundled data (sorted)."""
    return sorted(
        p
        for p in PACKAGE.rglob("*")
        if p.suffix in CODE_SUFFIXES and p.is_file() and "__pycache__" not in p.parts
    )


@functools.cache
def code_hash() -> str:
    """SHA-256 (16 hex digits) of mlpim's own files, names and contents; once per process."""
    h = hashlib.sha256()
    for path in code_files():
        h.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def code_version() -> dict:
    """What DONE records about the code: version, commit, dirty flag and `code_hash`."""
    return {
        "mlpim_version": __version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "code_hash": code_hash(),
    }


def _get(cfg: DictConfig | dict, dotted: str):
    node = cfg
    for key in dotted.split("."):
        node = node.get(key) if hasattr(node, "get") else None
        if node is None:
            return None
    return node


def input_files(cfg: DictConfig | dict) -> dict[str, Path]:
    """Every file the config names for the run to read, by the option that names it: the path
    options every experiment has, then the experiment's own (`Experiment.inputs`; a file read in
    a run folder is `option/<file>` for a glob). A named file that does not exist is listed too
    (its hash is None)."""
    files = {}
    for key, inside in {**dict.fromkeys(FILE_OPTIONS), **_experiment_inputs(cfg)}.items():
        if p := _get(cfg, key):
            files |= _named_files(key, Path(str(p)).expanduser(), inside)
    return files


def _experiment_inputs(cfg: DictConfig | dict) -> dict[str, str | None]:
    """The experiment's own input options (none for a runner mlpim does not have)."""
    runner = _get(cfg, "runner")
    return dict(get_experiment(runner).inputs) if runner in runner_names() else {}


def _named_files(key: str, path: Path, inside: str | None) -> dict[str, Path]:
    """The files option `key` names by `path`: itself; the glob `inside` of a folder, each by its
    name; or the file `inside` of a folder."""
    if inside is None:
        return {key: path}
    if "*" in inside:
        return {f"{key}/{p.name}": p for p in sorted(path.glob(inside))}
    return {key: path / inside if path.is_dir() else path}


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file's content, or of a folder's files (names and contents: a pyvene or
    SAELens direction, a saved dataset), read each time: never a stale hash; None when it does
    not exist."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            h.update(bytes.fromhex(file_sha256(p)))
        return h.hexdigest()
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def input_hashes(cfg: DictConfig | dict) -> dict[str, str | None]:
    """{option: SHA-256 of the file's content} for every file of `input_files`."""
    return {key: file_sha256(path) for key, path in input_files(cfg).items()}


def _code_text(record: dict) -> str:
    commit = record.get("git_commit") or "no commit"
    dirty = {True: "+dirty", False: "", None: ""}.get(record.get("git_dirty"), "")
    return f"mlpim {record.get('mlpim_version', '?')} {commit[:10]}{dirty}"


def code_change(done: dict) -> str | None:
    """How the code differs from the one that made a finished run (`DONE`), or None."""
    now = code_version()
    if "code_hash" not in done:
        return "the code that made it is unknown (its DONE is from an mlpim that did not record it)"
    if done["code_hash"] == now["code_hash"] and done.get("mlpim_version") == __version__:
        return None
    return f"the code changed: {_code_text(done)} -> {_code_text(now)}"


def input_change(done: dict, cfg: DictConfig | dict) -> str | None:
    """Which input files differ in content from those a finished run read, or None."""
    old, new = done.get("inputs"), input_hashes(cfg)
    if not isinstance(old, dict):
        return "its input files are unknown (its DONE is from an mlpim that did not record them)"
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if not changed:
        return None
    what = [
        f"{k} ({'missing now' if new.get(k) is None else 'new' if k not in old else 'content'})"
        for k in changed
    ]
    return f"input file(s) changed: {', '.join(what)}"
