"""Bad input refused before any model work (issue 18): meaningless or mislabelled direction files,
config values that cannot train or run, unknown `+` keys, missing task files, a file that is not
GGUF, a device this machine lacks, an unwritable or locked run directory. Each probe asserts the
exit code (2), one `mlpim: error:` line naming the problem, and that nothing was written: the run
directory does not even exist afterwards. The command line runs in this process (`cli`)."""

from __future__ import annotations

import fractions
import json
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import FAST, cli, on_disk, one_line

from mlpim import lock
from mlpim.analysis import illusion
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.checks.component_vs_subspace import component_check
from mlpim.analysis.checks.dormant_row_part import dormant_check
from mlpim.analysis.checks.effect import effect_check
from mlpim.analysis.references import Refs
from mlpim.config import compose
from mlpim.engine.direction import load_direction
from mlpim.engine.readers import file_kind
from mlpim.engine.readers.record import basis_problem
from mlpim.engine.subspace import save_subspace
from mlpim.errors import MlpimError

CHECK = ["experiment=illusion_check", *FAST, "direction_site=mlp_post", "direction_layer=1"]


def unit(d: int = 128) -> np.ndarray:
    v = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    return v / np.linalg.norm(v)


SUFFIX = {"npy_as_pt": ".pt", "npz": ".npz", "text": ".pt", "empty": ".pt", "pickle": ".pt"}
SUFFIX |= {"nan_subspace": ".pt"}  # every other probe is a .npy file


def make(tmp_path: Path, name: str) -> Path:
    """A direction file of the kind `name` (each a probe of the issue)."""
    path = tmp_path / f"d{SUFFIX.get(name, '.npy')}"
    v = unit()
    if name in ("nan", "inf"):
        v[5] = np.nan if name == "nan" else np.inf
    arrays = {
        "zero": np.zeros(128, np.float32),
        "tiny_norm": v * 1e-9,
        "strings": np.array(["a", "b"]),
        "matrix3d": np.ones((128, 2, 2), np.float32),
    }
    if name in ("nan", "inf", *arrays):
        np.save(path, arrays.get(name, v))
    elif name == "object":
        np.save(path, np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
    elif name == "torch_as_npy":
        torch.save(torch.from_numpy(v), path)
    elif name == "npy_as_pt":
        np.save(tmp_path / "tmp.npy", v)
        (tmp_path / "tmp.npy").rename(path)
    elif name == "npz":  # readable (issue 21), but which of its arrays is the direction?
        np.savez(path, v=v, w=v)
    elif name == "text":
        path.write_text("hello\n")
    elif name == "empty":
        path.write_bytes(b"")
    elif name == "pickle":
        path.write_bytes(pickle.dumps(fractions.Fraction(1, 3)))
    elif name == "nan_subspace":
        basis = torch.full((128, 1), float("nan"))
        save_subspace(path, basis, model="tiny", site="mlp_post", layer=1, k=1)
    return path


DIRECTIONS = {  # probe -> what the one line must say
    "nan": ["1 non-finite value(s)", "no direction to check"],
    "inf": ["1 non-finite value(s)"],
    "zero": ["norm 0", "points nowhere"],
    "tiny_norm": ["zero or below 1e-06"],
    "nan_subspace": ["128 non-finite value(s)"],
    "object": ["numpy file of Python objects", "never unpickles"],
    "strings": ["dtype <U1, not real numbers"],
    "torch_as_npy": ["a torch file named .npy", "rename it to d.pt"],
    "npy_as_pt": ["a numpy .npy file named .pt", "rename it to d.npy"],
    "npz": ["holds 2 tensors", "choose one with direction_key="],
    "text": ["a text file, not a torch (.pt) or numpy (.npy) file", "pyvene or SAELens folder"],
    "empty": ["an empty file"],
    "pickle": ["a Python pickle that mlpim cannot load as tensors", "never runs code"],
    "matrix3d": ["shape (128, 2, 2)"],
}


@pytest.mark.parametrize("name", DIRECTIONS)
def test_meaningless_or_mislabelled_direction_is_refused(name, tmp_path, capsys):
    """No verdict for a direction that means nothing or a file that is not what it says: one
    line before any model work, and no run directory at all."""
    path = make(tmp_path, name)
    code, out = cli(capsys, "run", *CHECK, f"direction={path}", f"hydra.run.dir={tmp_path}/r")
    line = one_line(code, out, f"direction={path}", *DIRECTIONS[name])
    assert "likely illusory" not in out and "verdict" not in out, line
    assert not (tmp_path / "r").exists()


def test_rank_deficient_basis_is_refused(tmp_path, capsys):
    """A 2-D basis whose columns are parallel spans one dimension: QR would invent the other."""
    path = tmp_path / "b.npy"
    np.save(path, np.stack([unit(), 2 * unit()], 1))
    args = [
        "experiment=ioi_mlp8_das",
        *FAST,
        "method.dim=2",
        f"direction={path}",
        "direction_site=mlp_post",
        "direction_layer=1",
        f"hydra.run.dir={tmp_path}/r",
    ]
    code, out = cli(capsys, "run", *args)
    one_line(code, out, "rank-deficient basis", "span only 1 dimension(s)")
    assert not (tmp_path / "r").exists()


def test_direction_checks_accept_real_directions(tmp_path):
    """The same loader passes what DAS saves and a plain unit vector, unchanged."""
    basis = torch.linalg.qr(torch.randn(128, 2))[0]
    save_subspace(tmp_path / "s.pt", basis, model="tiny", site="mlp_post", layer=1, k=2)
    assert torch.equal(load_direction(tmp_path / "s.pt").basis, basis)
    np.save(tmp_path / "v.npy", 3 * unit())
    v = load_direction(tmp_path / "v.npy", site="mlp_post", layer=1).basis
    assert v.shape == (128, 1) and torch.allclose(v.norm(), torch.tensor(1.0))
    assert basis_problem(basis) is None and basis_problem(torch.ones(4)) is None
    assert file_kind(tmp_path / "s.pt") == "torch" and file_kind(tmp_path / "v.npy") == "npy"


def test_no_effect_gets_no_verdict_on_the_checks():
    """Below the effect gate the verdict is "no effect to explain" with FLDD(v) and the gate,
    never a borderline that mentions "likely illusory", even when checks would warn above it."""
    th, refs = Thresholds.from_mapping(compose([]).check), Refs()
    checks = [
        effect_check(0.001, refs, th),
        component_check(0.001, -0.5, th),  # a site note that fires
        dormant_check(5.0, refs, th),  # a direction check that would warn
    ]
    v = illusion.verdict(checks)
    assert checks[2].warning and v.klass == illusion.NO_EFFECT
    assert v.label == "no effect to explain (FLDD 0.001 below the gate 0.200)"
    assert "illusory" not in v.label


CONFIGS = {  # probe -> (overrides, what the line must say)
    "lr_0": (["method.lr=0"], ["method.lr=0.0", "above 0"]),
    "lr_negative": (["method.lr=-1"], ["method.lr=-1.0", "above 0"]),
    "epochs_0": (["method.epochs=0"], ["method.epochs=0", "at least 1"]),
    "batch_size_0": (["dataset.batch_size=0"], ["dataset.batch_size=0", "at least 1"]),
    "plus_typo": (["+method.dimm=2"], ["unknown option method.dimm", "did you mean method.dim?"]),
    "plusplus_typo": (["++dataset.min_pair=3"], ["unknown option dataset.min_pair"]),
    "extra_typo": (["extra.n_randm=5"], ["ioi_mlp8_das has no option extra.n_randm"]),
    "extra_plus": (["+extra.n_random=5"], ["has no option extra.n_random", "no extra.* options"]),
    "device": (["device=cuda"], ["device=cuda", "CUDA is not available", "device=cpu"]),
    "device_name": (["device=gpu"], ["device=gpu: not a device"]),
    "path_missing": (["dataset=pairs", "dataset.path=/no/such.jsonl"], ["no such file"]),
    "path_dir": (["dataset=pairs", "dataset.path={tmp}"], [": a directory"]),
    "path_none": (["dataset=pairs"], ["dataset=pairs needs the task file"]),
    "gguf_magic": (["model=gguf", "model.file={tmp}/x.gguf"], ["not a GGUF file", "b'root'"]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_mistakes_are_one_line(name, tmp_path, capsys):
    if name == "device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "x.gguf").write_text("root:x:0:0:root:/root:/bin/bash\n")  # like /etc/passwd
    overrides, needles = CONFIGS[name]
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    args = ["experiment=ioi_mlp8_das", *FAST, *overrides, f"hydra.run.dir={tmp_path}/r"]
    one_line(*cli(capsys, "run", *args), *needles)
    assert not (tmp_path / "r").exists()


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory this process cannot write: chmod (non-root), a read-only tmpfs (root)."""
    import os

    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("root without the right to mount a read-only tmpfs")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_unwritable_output_dir_is_one_line(readonly_dir, capsys):
    args = ["experiment=ioi_mlp8_das", *FAST, f"hydra.run.dir={readonly_dir}/run"]
    one_line(*cli(capsys, "run", *args), f"{readonly_dir}/run", "choose a directory you can")
    assert on_disk(readonly_dir) == {}
    args[-1] = f"hydra.sweep.dir={readonly_dir}/sweep"
    one_line(*cli(capsys, "run", "-m", *args, "seed=0,1"), f"{readonly_dir}/sweep")


def test_run_dir_in_use_is_refused_and_left_alone(tmp_path, capsys):
    """Another holder of the directory's lock (its own open file, as another process would
    have): refused in one line, nothing written into it. test_faults_runs has a second process."""
    import fcntl
    import os

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("experiment: ioi_mlp8_das\n")  # the other run's
    before = on_disk(run_dir)
    fd = os.open(run_dir, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        args = ["experiment=ioi_mlp8_das", *FAST, f"hydra.run.dir={run_dir}"]
        one_line(*cli(capsys, "run", *args), str(run_dir.resolve()), "in use by another mlpim")
        sweep = ["-m", *args[:-1], "seed=0,1", f"hydra.sweep.dir={run_dir}"]
        one_line(*cli(capsys, "run", *sweep), "in use by another mlpim sweep")
    finally:
        os.close(fd)
    assert on_disk(run_dir) == before  # no .hydra/, status.json, multirun.yaml, run.log
    lock.acquire(run_dir)  # free again
    with pytest.raises(MlpimError, match="already in use by this process"):
        lock.acquire(run_dir)
    lock.release(run_dir)
    assert not lock.is_locked(run_dir)


LATE = {  # probe (issue 32) -> (overrides, what the line must say): refused before the model loads
    "seed_negative": (["seed=-1"], ["seed=-1", "0 or more"]),
    "test_fraction": (["dataset.test_fraction=1.5"], ["dataset.test_fraction=1.5", "0 to 1"]),
    "engine": (["method.engine=bogus"], ["method.engine=bogus", "allowed: auto, kernel"]),
    "device_mps": (["device=mps"], ["device=mps", "MPS is not available", "device=cpu"]),
    "device_meta": (["device=meta"], ["device=meta", "cpu, cuda or mps"]),
}


@pytest.mark.parametrize("experiment", ["ioi_mlp8_das", "illusion_check"])
@pytest.mark.parametrize("name", LATE)
def test_values_are_checked_before_the_model_loads(name, experiment, tmp_path, capsys):
    """One seed policy (0 or more) for every experiment; a share, an engine, a device."""
    if name == "device_mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    np.save(tmp_path / "v.npy", unit())
    base = [*CHECK, f"direction={tmp_path}/v.npy"] if experiment == "illusion_check" else FAST
    overrides, needles = LATE[name]
    args = [f"experiment={experiment}", *base, *overrides, f"hydra.run.dir={tmp_path}/r"]
    one_line(*cli(capsys, "run", *args), *needles)
    assert not (tmp_path / "r").exists()


MIB_ROW = {
    "prompt": "When Mary and John went to the store, John gave a drink to",
    "choices": ["Mary", "John"],
    "answerKey": 0,
    "s2_io_flip_counterfactual": {"prompt": "When Mary and John went, Mary gave to", "label": "J"},
}
TASK_FILES = {  # probe -> (the file's bytes, dataset, what the line must say)
    "latin1": (b'{"base": "caf\xe9"}\n', "pairs", ["not UTF-8, line 1", "byte 0xe9"]),
    "latin1_line3": (b"\n\n\xff\n", "pairs", ["not UTF-8, line 3"]),
    "empty": (b"", "pairs", ["is empty (no pairs)", "one JSON object per line"]),
    "blank_lines": (b"\n  \n\n", "pairs", ["is empty (no pairs)"]),
    "comments": (b"# my task\n# more\n", "pairs", ["holds only # lines", "JSON has no comments"]),
    "array": (
        json.dumps([{"base": "a"}, {"base": "b"}], indent=2).encode(),
        "pairs",
        ["is a JSON array", "one JSON object per line (JSON Lines"],
    ),
    "no_pair": (b'{"base": "a"}\n', "pairs", ["3 problem(s)"]),
    "mib_empty": (b"\n", "mib", ["is empty: no MIB rows"]),
    "mib_latin1": (b"\xe9\n", "mib", ["not UTF-8, line 1"]),
    "mib_counterfactual": (
        (json.dumps(MIB_ROW) + "\n").encode(),
        "mib",
        ["counterfactual 'bogus' is not in the rows", "available: s2_io_flip"],
    ),
}


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_file_is_read_whole_before_the_model_loads(name, tmp_path, capsys):
    """A task file that can give no pair is refused in preflight, by the task's own reader:
    one line (then the problem lines, indented), exit 2, no run directory."""
    data, dataset, needles = TASK_FILES[name]
    task = tmp_path / "task.jsonl"
    task.write_bytes(data)
    args = ["experiment=ioi_mlp8_das", *FAST, f"dataset={dataset}", f"dataset.path={task}"]
    args += ["dataset.counterfactual=bogus"] if dataset == "mib" else []
    one_line(*cli(capsys, "run", *args, f"hydra.run.dir={tmp_path}/r"), str(task), *needles)
    assert not (tmp_path / "r").exists()


def test_task_file_with_a_bom_is_read(tmp_path):
    """A UTF-8 byte order mark (Windows editors write one) is tolerated."""
    from faults import pair_rows

    from mlpim.tasks.pairs import read_jsonl

    text = "".join(json.dumps(r) + "\n" for r in pair_rows())
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(read_jsonl(tmp_path / "t.jsonl")) == 24


def test_hydra_composition_errors_are_one_line(tmp_path, capsys):
    """An unknown config, a value of the wrong type, a YAML syntax error (its file, line and
    column): one line, exit 2, nothing written."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text("runner: [a\nb: c\n")
    run_dir = f"hydra.run.dir={tmp_path}/r"
    one_line(
        *cli(capsys, "run", "experiment=nonexistent", *FAST, run_dir),
        "Could not find 'experiment/nonexistent'",
        "Available options in 'experiment': fact_editing",
    )
    one_line(
        *cli(capsys, "run", "seed=abc", *FAST, run_dir),
        "seed=abc",
        "'abc' of type 'str' could not be converted to Integer",
    )
    one_line(
        *cli(capsys, "run", "--config-dir", f"{tmp_path}/conf", "experiment=mine", *FAST, run_dir),
        f"YAML syntax error in {tmp_path}/conf/experiment/mine.yaml, line 2, column 2",
        "expected ',' or ']'",
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["folder_name", "path"])
def test_run_dir_too_long_is_one_line(kind, tmp_path, capsys):
    run_dir = (
        tmp_path / ("x" * 300) if kind == "folder_name" else tmp_path / "/".join(["y" * 200] * 25)
    )
    args = ["experiment=ioi_mlp8_das", *FAST, f"hydra.run.dir={run_dir}"]
    needle = "a folder name of 300 characters" if kind == "folder_name" else "path is too long"
    one_line(*cli(capsys, "run", *args), needle, "hydra.run.dir=")
    assert on_disk(tmp_path) == {}


def test_check_needs_a_direction(tmp_path, capsys, monkeypatch):
    """`mlpim check` alone: one line, exit 2 (not the help and exit 0)."""
    monkeypatch.chdir(tmp_path)
    one_line(*cli(capsys, "check"), "mlpim check needs the direction first")
    assert on_disk(tmp_path) == {}
    code, out = cli(capsys, "check", "--help")
    assert code == 0 and "usage: mlpim check" in out


def test_empty_sweep_is_refused(tmp_path, capsys):
    """A sweep over no value has no jobs: one line, exit 2, no multirun.yaml left behind."""
    np.save(tmp_path / "v.npy", unit())
    args = ["-m", str(tmp_path / "v.npy"), *CHECK[1:], "direction_columns=range(5,2)"]
    line = one_line(*cli(capsys, "check", *args, f"hydra.sweep.dir={tmp_path}/s"))
    assert "direction_columns=range(5,2) sweeps over no value" in line
    assert not (tmp_path / "s").exists()


def test_no_landmark_names_the_signal_block():
    """A model without landmarks whose config names its signal block says so (gemma3-270m)."""
    from mlpim.experiments.common import site_of

    cfg = compose(["model=gemma3-270m"])
    with pytest.raises(MlpimError, match=r"signal block 10 \(signal_peak\): set site.layer=10"):
        site_of(cfg, None)
