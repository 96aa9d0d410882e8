"""`make paper`'s driver on the tiny model: steps run in order, directions are reused, REPORT.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mlpim import constants as C

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper.py"


def _paper():
    spec = importlib.util.spec_from_file_location("paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_steps_report_and_resume(tmp_path):
    paper = _paper()  # extra.known_only=false below: a random model knows no fact
    steps = "ioi_baseline,ioi_mlp8_das,ioi_nullspace"
    args = ["--only", steps, "--out", str(tmp_path), "model=tiny", "method.epochs=1"]
    paper.main(args)
    for step in steps.split(","):
        assert (tmp_path / step / C.DONE).exists()
    report = (tmp_path / "REPORT.md").read_text()
    assert "| full MLP patch: FLDD | -0.08 |" in report  # paper value next to a measured one
    assert "n/a" in report  # steps that did not run are marked, not invented
    # the nullspace step used the direction saved by ioi_mlp8_das instead of training its own
    cfg = (tmp_path / "ioi_nullspace" / C.RESOLVED_CONFIG).read_text()
    assert f"{tmp_path}/ioi_mlp8_das/{C.DIRECTION}" in cfg
    # a second call reuses every finished step and rewrites the report
    stamp = (tmp_path / "ioi_baseline" / C.METRICS).stat().st_mtime_ns
    paper.main(args)
    assert (tmp_path / "ioi_baseline" / C.METRICS).stat().st_mtime_ns == stamp
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert "ioi_mlp8_das__interventions.png" in figures
    assert not [f for f in figures if f.startswith("figures__")]  # no copies of copies


@pytest.mark.slow
def test_whole_paper_on_the_gpt2_code_path(tmp_path, gpt2_dir):
    """Every step of `make paper MODEL=gpt2-small`, on a tiny GPT-2 saved like a downloaded one
    (the real loading and weight processing; landmarks moved into its 2 layers)."""
    paper = _paper()  # extra.known_only=false below: a random model knows no fact
    tiny = [
        "model=gpt2-small",
        f"model.path={gpt2_dir}",
        "device=cpu",
        "method.epochs=1",
        "dataset.n_train_pairs=40",
        "dataset.n_test_pairs=20",
        "dataset.n_eval_prompts=40",
        "model.landmarks.handover_layer=0",
        "model.landmarks.mlp_in_the_middle=0",
        "model.landmarks.name_movers=[[1,0],[1,2]]",
        "++extra.chunk_len=32",
        "extra.known_only=false",
    ]
    paper.main(["--out", str(tmp_path), *tiny])
    for name, _, _ in paper.STEPS:
        assert (tmp_path / name / C.DONE).exists(), name
    report = (tmp_path / "REPORT.md").read_text()
    assert "# Paper numbers vs gpt2-small" in report
    measured = {
        line.split(" | ")[0][2:]: line.split(" | ")[2]
        for line in report.splitlines()
        if line.startswith("| ") and line.count(" | ") == 3
    }
    missing = {q for q, _, _, _ in paper.COMPARE if measured.get(q, "n/a") == "n/a"}
    # every compared quantity was measured, except what a 64-neuron MLP cannot have
    assert missing == {"neuron budget: FLDD with the first 128 neurons"}


def test_extra_overrides_go_to_the_steps_that_take_them(tmp_path):
    from mlpim.errors import MlpimError

    paper = _paper()
    overrides = ["++extra.chunk_len=32", "extra.known_only=false", "method.epochs=1"]
    assert paper.for_step("mlp_recovery", overrides) == ["++extra.chunk_len=32", "method.epochs=1"]
    assert paper.for_step("fact_editing", overrides) == overrides
    assert paper.for_step("ioi_baseline", overrides) == ["method.epochs=1"]
    with pytest.raises(MlpimError, match="no step of this report takes extra.n_randm=5"):
        paper.plan(tmp_path, {"ioi_baseline", "ioi_locate"}, ["extra.n_randm=5"])
    with pytest.raises(MlpimError, match="takes extra.chunk_len=32"):  # not in these steps
        paper.plan(tmp_path, {"ioi_baseline"}, ["extra.chunk_len=32"])


def test_report_puts_other_models_beside_and_rewrites_from_finished_steps(tmp_path):
    paper = _paper()
    first, other = tmp_path / "tiny", tmp_path / "other-model"
    args = ["--only", "ioi_baseline", "model=tiny", "method.epochs=1"]
    paper.main([*args, "--out", str(first)])
    paper.main([*args, "--out", str(other), "dataset.n_test_pairs=20"])
    paper.main(["--report-only", "--out", str(first), "--beside", str(other), "model=tiny"])
    report = (first / "REPORT.md").read_text()
    assert "# Paper numbers vs other-model, tiny" in report  # columns by name after the default's
    assert "| quantity | paper (GPT-2 small) | other-model | tiny | experiment |" in report
    row = next(r for r in report.splitlines() if r.startswith("| clean logit difference |"))
    theirs, ours = row.split(" | ")[2:4]
    assert ours == paper.lookup(first, "ioi_baseline", paper.COMPARE[1][3])
    assert theirs == paper.lookup(other, "ioi_baseline", paper.COMPARE[1][3]) != "n/a"
    assert "| step (s) | other-model | tiny |" in report
    assert f"- other-model: {other}, 1 of {len(paper.STEPS)} steps" in report
    # --report-only ran nothing: the finished step's metrics are untouched
    assert (first / "ioi_baseline" / C.DONE).exists() and not (first / "ioi_mlp8_das").exists()


def test_a_model_without_landmarks_is_studied_at_its_signal_peak_or_refused(capsys):
    from mlpim.errors import MlpimError

    paper = _paper()
    assert paper.landmark_overrides(["model=tiny"]) == []
    gemma = paper.landmark_overrides(["model=gemma3-270m"])
    assert gemma == [
        "model.landmarks.mlp_in_the_middle=10",
        "model.landmarks.handover_layer=10",
    ]
    assert "studies layer 10" in capsys.readouterr().out
    with pytest.raises(MlpimError, match="has no landmarks"):
        paper.landmark_overrides(["model=tiny", "model.landmarks.mlp_in_the_middle=null"])
