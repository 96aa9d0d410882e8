"""`make paper`'s driver on the tiny model: steps run in order, directions are reused, REPORT.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mlpim import constants as C

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper.py"


def _paper():
    spec = importlib.util.spec_from_file_location("paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_steps_report_and_resume(tmp_path):
    paper = _paper()
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
