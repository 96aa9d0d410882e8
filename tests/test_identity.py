"""A run's identity is its config, its code and its inputs (issue 17): what DONE records, when a
finished run is skipped, refused or (by `make paper`) re-run; every saved direction carries the
fingerprint of its model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import FAST

import mlpim.experiments
from mlpim import constants as C
from mlpim import identity
from mlpim.config import compose
from mlpim.engine.direction import load_direction
from mlpim.errors import ConfigError
from mlpim.experiments import Experiment
from mlpim.options import NoOptions
from mlpim.run import RunDirError, read_done, run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper.py"


def write_direction(path: Path, seed: int) -> Path:
    """A plain 128-wide tensor direction (the tiny model's d_mlp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.randn(128, generator=torch.Generator().manual_seed(seed)), path)
    return path


@pytest.fixture
def fake_runner(monkeypatch):
    """Every runner replaced by a fast one: one metric row, and a direction file whose content
    depends on `seed` (as a re-trained direction would). Returns the run dirs it ran in."""
    calls = []

    def runner(cfg, run_dir, directions):
        calls.append(Path(run_dir).name)
        write_direction(Path(run_dir) / C.DIRECTION, cfg.seed)
        return pd.DataFrame(
            [
                {
                    "model": "tiny",
                    "experiment": cfg.experiment,
                    "intervention": "x",
                    "split": "test",
                    "metric": "x",
                    "value": float(cfg.seed),
                }
            ]
        )

    monkeypatch.setattr(
        mlpim.experiments, "get_experiment", lambda name: Experiment(runner, NoOptions)
    )
    return calls


def other_code(monkeypatch) -> None:
    """Pretend mlpim's files changed since (another code hash)."""
    monkeypatch.setattr(identity, "code_hash", lambda: "0123456789abcdef")


def test_done_records_code_and_the_content_of_every_input(tmp_path, fake_runner):
    v = write_direction(tmp_path / "v.pt", 0)
    r = write_direction(tmp_path / "r.pt", 1)
    cfg = compose(["experiment=ioi_dormant", *FAST, f"direction={v}", f"extra.resid_direction={r}"])
    run(cfg, tmp_path / "run")
    done = read_done(tmp_path / "run")
    assert done["code_hash"] == identity.code_hash() and len(done["code_hash"]) == 16
    assert done["mlpim_version"] and "git_commit" in done and "git_dirty" in done
    assert done["inputs"] == {
        "direction": identity.file_sha256(v),
        "extra.resid_direction": identity.file_sha256(r),
    }
    assert len(done["inputs"]["direction"]) == 64
    assert run(cfg, tmp_path / "run") is None and fake_runner == ["run"]  # all same: skipped


def test_changed_code_is_refused_in_one_line(tmp_path, fake_runner, monkeypatch):
    cfg = compose(["experiment=ioi_mlp8_das", *FAST])
    run(cfg, tmp_path / "run")
    before = (tmp_path / "run" / C.METRICS).read_bytes()
    other_code(monkeypatch)
    with pytest.raises(
        RunDirError, match=r"the code changed: mlpim .* -> mlpim .*hydra.run.dir"
    ) as e:
        run(cfg, tmp_path / "run")
    assert e.value.changed == "code" and "\n" not in str(e.value)
    assert fake_runner == ["run"] and (tmp_path / "run" / C.METRICS).read_bytes() == before


def test_changed_direction_file_is_refused_unchanged_is_skipped(tmp_path, fake_runner):
    v = write_direction(tmp_path / "v.pt", 0)
    cfg = compose(["experiment=ioi_nullspace", *FAST, f"direction={v}"])
    run(cfg, tmp_path / "run")
    write_direction(v, 0)  # rewritten with the same content: still the same input
    assert run(cfg, tmp_path / "run") is None
    write_direction(v, 7)  # same path, same size, other content
    with pytest.raises(RunDirError, match=r"input file\(s\) changed: direction \(content\)") as e:
        run(cfg, tmp_path / "run")
    assert e.value.changed == "inputs" and fake_runner == ["run"]


def test_done_of_an_older_mlpim_is_refused(tmp_path, fake_runner):
    cfg = compose(["experiment=ioi_mlp8_das", *FAST])
    run(cfg, tmp_path / "run")
    done = read_done(tmp_path / "run")
    old = {k: done[k] for k in ("config_hash", "experiment", "mlpim_version", "git_commit")}
    (tmp_path / "run" / C.DONE).write_text(json.dumps(old))
    with pytest.raises(RunDirError, match="the code that made it is unknown"):
        run(cfg, tmp_path / "run")


def test_input_files_come_from_every_path_option(tmp_path):
    pair_run, locate = tmp_path / "pairs", tmp_path / "locate"
    for name in ("pair_directions_L0.pt", "pair_directions_L2.pt", "other.pt"):
        write_direction(pair_run / name, 0)
    (locate / C.METRICS).parent.mkdir()
    (locate / C.METRICS).write_text("a\n1\n")
    (tmp_path / "corpus.txt").write_text("text")
    corpus = tmp_path / "corpus.txt"
    cfg = compose(
        [
            "experiment=fact_editing",
            "dataset.path=/no/such/facts.jsonl",
            f"extra.pair_run={pair_run}",
            f"extra.corpus_path={corpus}",
        ]
    )
    files = identity.input_files(cfg)
    assert set(files) == {
        "dataset.path",
        "extra.corpus_path",
        "extra.pair_run/pair_directions_L0.pt",
        "extra.pair_run/pair_directions_L2.pt",
    }
    profile = compose(["experiment=ioi_layer_profile", f"extra.locate_run={locate}"])
    assert identity.input_files(profile) == {"extra.locate_run": locate / C.METRICS}
    hashes = identity.input_hashes(cfg)
    assert hashes["dataset.path"] is None and len(hashes["extra.corpus_path"]) == 64
    model_file = compose(["model=gguf", f"model.file={tmp_path / 'corpus.txt'}"])
    assert identity.input_files(model_file) == {"model.file": tmp_path / "corpus.txt"}


def test_code_hash_covers_mlpim_files(tmp_path, monkeypatch):
    (tmp_path / "pkg" / "conf").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "conf" / "c.yaml").write_text("k: 1\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    monkeypatch.setattr(identity, "PACKAGE", tmp_path / "pkg")
    hashes = []
    for change in (None, ("notes.txt", "still not code"), ("conf/c.yaml", "k: 2\n")):
        if change:
            (tmp_path / "pkg" / change[0]).write_text(change[1])
        identity.code_hash.cache_clear()
        hashes.append(identity.code_hash())
    identity.code_hash.cache_clear()
    assert hashes[0] == hashes[1] != hashes[2]


def _paper():
    spec = importlib.util.spec_from_file_location("paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_reruns_a_step_whose_upstream_direction_changed(tmp_path, fake_runner, capsys):
    paper = _paper()
    args = ["--only", "ioi_mlp8_das,ioi_nullspace", "--out", str(tmp_path), "model=tiny"]
    paper.main(args)
    paper.main(args)  # all finished and unchanged: nothing runs
    assert fake_runner == ["ioi_mlp8_das", "ioi_nullspace"]
    old = (tmp_path / "ioi_nullspace" / C.METRICS).read_bytes()
    write_direction(tmp_path / "ioi_mlp8_das" / C.DIRECTION, 5)  # upstream re-trained
    capsys.readouterr()
    paper.main(args)
    assert fake_runner == ["ioi_mlp8_das", "ioi_nullspace", "ioi_nullspace"]
    moved = list((tmp_path / "superseded").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("ioi_nullspace-")
    assert (moved[0] / C.METRICS).read_bytes() == old  # the old results kept, not overwritten
    lines = [x for x in capsys.readouterr().out.splitlines() if "re-running" in x]
    assert len(lines) == 1 and "direction (content)" in lines[0]
    done = read_done(tmp_path / "ioi_nullspace")
    direction = tmp_path / "ioi_mlp8_das" / C.DIRECTION
    assert done["inputs"]["direction"] == identity.file_sha256(direction)
    paper.main(args)  # and now it is current again
    assert len(fake_runner) == 3


def test_paper_keeps_a_step_whose_upstream_direction_is_missing(tmp_path, fake_runner):
    paper = _paper()
    args = ["--only", "ioi_mlp8_das,ioi_nullspace", "--out", str(tmp_path), "model=tiny"]
    paper.main(args)
    (tmp_path / "ioi_mlp8_das" / C.DIRECTION).unlink()
    with pytest.raises(SystemExit, match=r"direction \(missing now\)"):
        paper.main(["--only", "ioi_nullspace", *args[2:]])
    assert (tmp_path / "ioi_nullspace" / C.DONE).exists() and not (tmp_path / "superseded").exists()


def test_paper_refuses_other_code_before_any_work(tmp_path, fake_runner, monkeypatch):
    paper = _paper()
    args = ["--only", "ioi_baseline,ioi_locate", "--out", str(tmp_path), "model=tiny"]
    paper.main(args)
    other_code(monkeypatch)
    with pytest.raises(SystemExit, match=r"ioi_baseline \(the code changed.*--out"):
        paper.main(args)
    assert fake_runner == ["ioi_baseline", "ioi_locate"]


def test_ioi_nullspace_direction_carries_its_model(tmp_path, tiny_llama):
    """ioi_nullspace's subspace.pt records the weights it was found on; another model's refused."""
    run(compose(["experiment=ioi_nullspace", *FAST]), tmp_path)
    saved = torch.load(tmp_path / C.DIRECTION, weights_only=True)
    assert len(saved["fingerprint"]) == 16 and saved["site"] == "mlp_post"
    assert {"proj", "null_proj", "processing", "width"} <= set(saved)
    direction = load_direction(tmp_path / C.DIRECTION)
    assert direction.fingerprint == saved["fingerprint"] and direction.site == "mlp_post"
    with pytest.raises(ConfigError, match="weights"):
        direction.fitted(tiny_llama)
