"""Bad input refused before any model work (issue 18): meaningless or mislabelled direction files,
config values that cannot train or run, unknown `+` keys, missing task files, a file that is not
GGUF, a device this machine lacks, an unwritable or locked run directory. Each probe asserts the
exit code (2), one `mlpim: error:` line naming the problem, and that nothing was written: the run
directory does not even exist afterwards. The command line runs in this process (`cli`)."""

from __future__ import annotations

import fractions
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PROBE, assert_one_line_error, cli, on_disk, pair_rows, tmpfs

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

CHECK = ["experiment=illusion_check", *PROBE, "direction_site=mlp_post", "direction_layer=1"]


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
    line = assert_one_line_error(code, out, f"direction={path}", *DIRECTIONS[name])
    assert "likely illusory" not in out and "verdict" not in out, line
    assert not (tmp_path / "r").exists()


def test_rank_deficient_basis_is_refused(tmp_path, capsys):
    """A 2-D basis whose columns are parallel spans one dimension: QR would invent the other."""
    path = tmp_path / "b.npy"
    np.save(path, np.stack([unit(), 2 * unit()], 1))
    args = [
        "experiment=ioi_mlp8_das",
        *PROBE,
        "method.dim=2",
        f"direction={path}",
        "direction_site=mlp_post",
        "direction_layer=1",
        f"hydra.run.dir={tmp_path}/r",
    ]
    code, out = cli(capsys, "run", *args)
    assert_one_line_error(code, out, "rank-deficient basis", "span only 1 dimension(s)")
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
    "path_fifo": (["dataset=pairs", "dataset.path={tmp}/fifo"], [": a device, pipe or socket"]),
    "gguf_magic": (["model=gguf", "model.file={tmp}/x.gguf"], ["not a GGUF file", "b'root'"]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_mistakes_are_one_line(name, tmp_path, capsys):
    if name == "device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "x.gguf").write_text("root:x:0:0:root:/root:/bin/bash\n")  # like /etc/passwd
    os.mkfifo(tmp_path / "fifo")  # reading it would hang: refused unread
    overrides, needles = CONFIGS[name]
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    args = ["experiment=ioi_mlp8_das", *PROBE, *overrides, f"hydra.run.dir={tmp_path}/r"]
    assert_one_line_error(*cli(capsys, "run", *args), *needles)
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
    with tmpfs(path, "ro,size=64k"):
        yield path


def test_unwritable_output_dir_is_one_line(readonly_dir, capsys):
    args = ["experiment=ioi_mlp8_das", *PROBE, f"hydra.run.dir={readonly_dir}/run"]
    assert_one_line_error(
        *cli(capsys, "run", *args), f"{readonly_dir}/run", "choose a directory you can"
    )
    assert on_disk(readonly_dir) == {}
    args[-1] = f"hydra.sweep.dir={readonly_dir}/sweep"
    assert_one_line_error(*cli(capsys, "run", "-m", *args, "seed=0,1"), f"{readonly_dir}/sweep")


def test_run_dir_in_use_is_refused_and_left_alone(tmp_path, capsys):
    """Another holder of the directory's lock (its own open file, as another process would
    have): refused in one line, nothing written into it. test_run_dirs has a second process."""
    import fcntl
    import os

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("experiment: ioi_mlp8_das\n")  # the other run's
    before = on_disk(run_dir)
    fd = os.open(run_dir, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        args = ["experiment=ioi_mlp8_das", *PROBE, f"hydra.run.dir={run_dir}"]
        assert_one_line_error(
            *cli(capsys, "run", *args), str(run_dir.resolve()), "in use by another mlpim"
        )
        sweep = ["-m", *args[:-1], "seed=0,1", f"hydra.sweep.dir={run_dir}"]
        assert_one_line_error(*cli(capsys, "run", *sweep), "in use by another mlpim sweep")
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
    base = [*CHECK, f"direction={tmp_path}/v.npy"] if experiment == "illusion_check" else PROBE
    overrides, needles = LATE[name]
    args = [f"experiment={experiment}", *base, *overrides, f"hydra.run.dir={tmp_path}/r"]
    assert_one_line_error(*cli(capsys, "run", *args), *needles)
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
    args = ["experiment=ioi_mlp8_das", *PROBE, f"dataset={dataset}", f"dataset.path={task}"]
    args += ["dataset.counterfactual=bogus"] if dataset == "mib" else []
    assert_one_line_error(
        *cli(capsys, "run", *args, f"hydra.run.dir={tmp_path}/r"), str(task), *needles
    )
    assert not (tmp_path / "r").exists()


def test_task_file_with_a_bom_is_read(tmp_path):
    """A UTF-8 byte order mark (Windows editors write one) is tolerated."""
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
    assert_one_line_error(
        *cli(capsys, "run", "experiment=nonexistent", *PROBE, run_dir),
        "Could not find 'experiment/nonexistent'",
        "Available options in 'experiment': fact_editing",
    )
    assert_one_line_error(
        *cli(capsys, "run", "seed=abc", *PROBE, run_dir),
        "seed=abc",
        "'abc' of type 'str' could not be converted to Integer",
    )
    assert_one_line_error(
        *cli(capsys, "run", "--config-dir", f"{tmp_path}/conf", "experiment=mine", *PROBE, run_dir),
        f"YAML syntax error in {tmp_path}/conf/experiment/mine.yaml, line 2, column 2",
        "expected ',' or ']'",
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["folder_name", "path"])
def test_run_dir_too_long_is_one_line(kind, tmp_path, capsys):
    run_dir = (
        tmp_path / ("x" * 300) if kind == "folder_name" else tmp_path / "/".join(["y" * 200] * 25)
    )
    args = ["experiment=ioi_mlp8_das", *PROBE, f"hydra.run.dir={run_dir}"]
    needle = "a folder name of 300 characters" if kind == "folder_name" else "path is too long"
    assert_one_line_error(*cli(capsys, "run", *args), needle, "hydra.run.dir=")
    assert on_disk(tmp_path) == {}


def test_check_needs_a_direction(tmp_path, capsys, monkeypatch):
    """`mlpim check` alone: one line, exit 2 (not the help and exit 0)."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*cli(capsys, "check"), "mlpim check needs the direction first")
    assert on_disk(tmp_path) == {}
    code, out = cli(capsys, "check", "--help")
    assert code == 0 and "usage: mlpim check" in out


def test_empty_sweep_is_refused(tmp_path, capsys):
    """A sweep over no value has no jobs: one line, exit 2, no multirun.yaml left behind."""
    np.save(tmp_path / "v.npy", unit())
    args = ["-m", str(tmp_path / "v.npy"), *CHECK[1:], "direction_columns=range(5,2)"]
    line = assert_one_line_error(*cli(capsys, "check", *args, f"hydra.sweep.dir={tmp_path}/s"))
    assert "direction_columns=range(5,2) sweeps over no value" in line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("experiment", "setting"),
    [("ioi_mlp8_das", "site.layer=10"), ("illusion_benchmark", "extra.layers=[10]")],
)
def test_no_landmark_names_the_signal_block(experiment, setting, tmp_path, capsys):
    """A model without landmarks is refused before it loads, with the layer its config names as
    the signal block (gemma3-270m: the benchmark's offsets failed after the model had loaded)."""
    args = [f"experiment={experiment}", "model=gemma3-270m", f"hydra.run.dir={tmp_path}/r"]
    code, out = cli(capsys, "run", *args)
    assert_one_line_error(code, out, "'gemma3-270m' has no landmark", f"set {setting}")
    assert not (tmp_path / "r").exists()


PYVENE_KEY = "layer_1_comp_block_output_unit_pos_nunit_1#0"


def pyvene_like(folder: Path) -> Path:
    """A folder laid out as pyvene's `save` writes it: config.json and one intkey_*.bin."""
    folder.mkdir()
    rep = [1, "block_output", "pos", 1, 1, *[None] * 9]
    kind = "<class 'pyvene.models.interventions.LowRankRotatedSpaceIntervention'>"
    config = {"representations": [rep], "intervention_types": [kind], "sorted_keys": [PYVENE_KEY]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save({"rotate_layer.weight": torch.zeros(64, 1)}, folder / f"intkey_{PYVENE_KEY}.bin")
    return folder


def cut_short(path: Path) -> Path:
    """`path` with its second half gone, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(the direction to give, the file cut short) for probe `name`."""
    if name in ("pyvene_bin", "pyvene_config"):
        folder = pyvene_like(tmp_path / "pv")
        inner = "config.json" if name == "pyvene_config" else f"intkey_{PYVENE_KEY}.bin"
        return folder, cut_short(folder / inner)
    path = tmp_path / {"subspace": "subspace.pt", "safetensors": "v.safetensors"}.get(name, name)
    if name == "subspace":
        basis = torch.linalg.qr(torch.randn(128, 2))[0]
        save_subspace(path, basis, model="tiny", site="mlp_post", layer=1, k=2)
    elif name == "safetensors":
        from safetensors.torch import save_file

        save_file({"v": torch.from_numpy(unit())}, path)
    elif name == "legacy.pt":
        torch.save(torch.from_numpy(unit()), path, _use_new_zipfile_serialization=False)
    else:
        np.savez(path, v=unit()) if name == "v.npz" else np.save(path, unit())
    return path, cut_short(path)


TRUNCATED = {  # probe (issue 32) -> what the line must say besides the file cut short
    "pyvene_bin": ["a truncated or corrupt torch file"],
    "pyvene_config": ["config.json is not valid JSON (line 17, column 7", "cut short"],
    "subspace": ["a truncated or corrupt zip archive", "its central directory is missing"],
    "safetensors": ["a truncated or corrupt safetensors file", "less than its header says"],
    "legacy.pt": ["a truncated or corrupt torch file"],
    "v.npz": ["a truncated or corrupt zip archive"],
    "v.npy": ["a truncated or corrupt numpy .npy file"],
}


@pytest.mark.parametrize("name", TRUNCATED)
def test_truncated_direction_is_named_corrupt(name, tmp_path, capsys):
    """A direction file cut short (an interrupted copy) is named as truncated or corrupt, not as
    a file of another kind or a safety refusal: one line, exit 2, no run directory."""
    direction, cut = truncated(tmp_path, name)
    place = [] if name.startswith("pyvene") else CHECK[-2:]  # pyvene's folder says its own
    args = [*CHECK[:-2], *place, f"direction={direction}", f"hydra.run.dir={tmp_path}/r"]
    assert_one_line_error(*cli(capsys, "run", *args), str(cut), *TRUNCATED[name])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("option", ["direction_site=mlp_post", "direction_layer=1"])
def test_direction_place_without_a_direction_is_refused(option, tmp_path, capsys):
    """direction_site=/direction_layer= say where a direction file is; without direction= they
    would be ignored (the run trained at site.layer): refused like direction_key= is."""
    args = ["experiment=ioi_mlp8_das", *PROBE, option, f"hydra.run.dir={tmp_path}/r"]
    name = option.split("=")[0]
    assert_one_line_error(
        *cli(capsys, "run", *args), f"{name} given without direction=: they say how to read"
    )
    assert not (tmp_path / "r").exists()


def test_check_reads_a_direction_in_a_sweep_job_folder(tmp_path, capsys):
    """`mlpim check DIR/method.dim=1,seed=0/v.npy`: a first argument with `=` and `,` that exists
    (a sweep's job folder) is the direction (here refused for its width, which shows it was
    read), not an override."""
    job = tmp_path / "method.dim=1,seed=0"
    job.mkdir()
    np.save(job / "v.npy", unit(64))
    args = [str(job / "v.npy"), *CHECK[1:], f"hydra.run.dir={tmp_path}/r"]
    line = assert_one_line_error(*cli(capsys, "check", *args), f"direction={job}/v.npy", "width 64")
    assert "needs the direction first" not in line
    assert not (tmp_path / "r").exists()
    assert_one_line_error(
        *cli(capsys, "check", "method.dim=1", *CHECK[1:]), "needs the direction first"
    )


def second_round(tmp_path: Path, name: str) -> Path:
    """A direction for probe `name` of the second probe round (issue 32)."""
    import os

    path = tmp_path / {"empty_npz": "d.npz", "empty_safetensors": "d.safetensors"}.get(name, "d")
    if name == "empty_npz":
        np.savez(path)
    elif name == "empty_safetensors":
        from safetensors.torch import save_file

        save_file({}, path)
    elif name == "fifo":
        os.mkfifo(path)
    elif name == "dangling_link":
        path.symlink_to(tmp_path / "moved.npy")
    else:
        path = tmp_path / "v.npy"
        np.save(path, unit() if name != "square_float_column" else np.eye(128, dtype=np.float32))
    return path


SECOND_ROUND = {  # probe -> (overrides, what the line must say)
    "empty_npz": ([], ["holds no tensors"]),
    "empty_safetensors": ([], ["holds no tensors"]),
    "fifo": ([], ["not a file or folder (a device, pipe or socket)"]),
    "dangling_link": ([], ["no such file or folder (a symbolic link to", "moved.npy)"]),
    "square_float_column": (["direction_columns=1.5"], ["1.5 must be distinct indices"]),
    "site_unknown": (["direction_site=bogus"], ["direction_site=bogus is not a site", "mlp_post"]),
}


@pytest.mark.parametrize("name", SECOND_ROUND)
def test_second_probe_round_is_refused_in_one_line(name, tmp_path, capsys):
    """An archive of no tensors (not "a text file"), a pipe (which would block the read), a
    link to nothing, a column that is no index (was a TypeError), a site that does not exist
    (was "width 128, but bogus of tiny is 64"): one line, exit 2, no run directory."""
    path = second_round(tmp_path, name)
    overrides, needles = SECOND_ROUND[name]
    place = [o for o in CHECK[-2:] if o.split("=")[0] not in {v.split("=")[0] for v in overrides}]
    args = [*CHECK[:-2], *place, *overrides, f"direction={path}", f"hydra.run.dir={tmp_path}/r"]
    assert_one_line_error(*cli(capsys, "run", *args), f"direction={path}", *needles)
    assert not (tmp_path / "r").exists()


def test_check_takes_one_direction(tmp_path, capsys, monkeypatch):
    """`mlpim check a.npy b.npy`: one line naming the second (was Hydra's "Error parsing"); an
    empty direction is none (was "direction_site, direction_layer given without direction=")."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, unit())
    line = assert_one_line_error(*cli(capsys, "check", "a.npy", "b.npy", *CHECK[1:]))
    assert "checks one direction: a.npy; b.npy is not an override (KEY=VALUE)" in line
    assert set(on_disk(tmp_path)) == {"a.npy", "b.npy"}
    assert_one_line_error(
        *cli(capsys, "check", "", *CHECK[1:]), "mlpim check needs the direction first"
    )


def test_list_takes_no_arguments(capsys):
    assert_one_line_error(*cli(capsys, "list", "junk", "--x"), "takes no arguments", "junk --x")


@pytest.mark.parametrize("experiment", ["illusion_benchmark", "fact_patching"])
def test_layers_outside_the_model_are_one_line(experiment, tmp_path, capsys):
    """`extra.layers` naming a layer the model lacks is refused before any work."""
    args = [f"experiment={experiment}", *PROBE, "extra.layers=[1,5]", f"hydra.run.dir={tmp_path}/r"]
    code, out = cli(capsys, "run", *args)
    assert_one_line_error(code, out, "extra.layers=[1, 5]", "layer 5 is outside", "layers 0..2")
    assert not (tmp_path / "r").exists()


def test_the_benchmark_plants_at_the_layers_given_or_around_the_landmark():
    """`extra.layers` (absolute, any task) wins over the offsets around IOI's landmark."""
    from types import SimpleNamespace

    from mlpim.experiments.illusion_benchmark import bench_layers
    from mlpim.options import IllusionBenchmarkOptions

    cfg = compose(["experiment=illusion_benchmark", *PROBE])
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=3))
    around = IllusionBenchmarkOptions(bench_layer_offsets=[-1, 0, 1, 2])
    assert bench_layers(cfg, model, around) == [0, 1, 2]
    given = IllusionBenchmarkOptions(layers=[2, 0, 2], bench_layer_offsets=[0])
    assert bench_layers(cfg, model, given) == [0, 2]
