"""Work shared across steps by content hash (`mlpim.reuse`) changes no number: a `make paper` on
the tiny model with reuse writes byte-identical tables to one without."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mlpim import reuse
from mlpim.engine.models import ModelSpec, load_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper.py"
TINY = ["model=tiny", "method.epochs=2", "dataset.n_train_pairs=40", "dataset.n_test_pairs=20"]
TINY += ["dataset.n_eval_prompts=40", "++extra.chunk_len=32", "extra.known_only=false"]


def _paper():
    spec = importlib.util.spec_from_file_location("paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tables(out: Path) -> dict[str, bytes]:
    """Every table, summary and direction file the steps wrote (not logs, DONE or the report's
    wall times)."""
    files = [p for p in out.rglob("*") if p.suffix in {".csv", ".md", ".pt"} and p.is_file()]
    return {str(p.relative_to(out)): p.read_bytes() for p in files if p.name != "REPORT.md"}


def tensors_of(blob: bytes) -> dict:
    """A saved direction file's tensors and metadata, with its content hash left out."""
    import io

    data = torch.load(io.BytesIO(blob), weights_only=False)
    return data if not isinstance(data, dict) else {k: v for k, v in data.items()}


@pytest.mark.slow
def test_paper_with_reuse_writes_the_same_tables(tmp_path, monkeypatch):
    paper = _paper()
    monkeypatch.setenv("MLPIM_REUSE", "0")
    paper.main(["--out", str(tmp_path / "plain"), *TINY, "extra.reference_cache=null"])
    monkeypatch.setenv("MLPIM_REUSE", "1")
    hits = {}
    monkeypatch.setattr(reuse, "hits", lambda real=reuse.hits: hits.update(real()) or hits)
    paper.main(["--out", str(tmp_path / "reused"), *TINY, "extra.reference_cache=null"])
    plain, reused = tables(tmp_path / "plain"), tables(tmp_path / "reused")
    assert sorted(plain) == sorted(reused) and len(plain) > 40
    csvs = [k for k in plain if not k.endswith(".pt")]
    differ = [
        k
        for k in csvs
        if plain[k].replace(b"/plain/", b"/X/") != reused[k].replace(b"/reused/", b"/X/")
    ]
    assert differ == []
    for k in (k for k in plain if k.endswith(".pt")):
        a, b = tensors_of(plain[k]), tensors_of(reused[k])
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert torch.equal(a[name], b[name]), (k, name)
    # and reuse happened: the model, prepared pairs, DAS runs. The check's random-MLP reference
    # (seeds batched, early-stopped: issue 33) is no longer the paper's ioi_random_mlp runs
    # (serial, every epoch), so those are not shared between the two steps any more.
    assert {"model", "prepare", "das"} <= set(hits), hits


def test_digest_tells_apart_what_differs():
    a = torch.arange(6.0).reshape(2, 3)
    assert reuse.digest(a) == reuse.digest(a.clone())
    assert reuse.digest(a) != reuse.digest(a.reshape(3, 2))
    assert reuse.digest(a) != reuse.digest(a.double())
    assert reuse.digest(a, 1) != reuse.digest(a, 2)
    b = a.clone()
    b[1, 2] += 1e-6
    assert reuse.digest(a) != reuse.digest(b)


def _tiny():
    spec = {"name": "tiny", "source": "tiny", "arch": "llama"}
    return load_model(ModelSpec.from_mapping(spec), vocab=["Mary", "John", "gave", "a", "to"])


def test_weights_hash_follows_in_place_edits():
    with reuse.session():
        model = _tiny()
        before = reuse.weights_hash(model)
        w = next(model.parameters())
        with torch.no_grad():
            saved = w.clone()
            w.add_(1e-3)
        edited = reuse.weights_hash(model)
        with torch.no_grad():
            w.copy_(saved)
        assert edited != before
        assert reuse.weights_hash(model) == before  # restored exactly: the same content


def test_a_model_is_shared_only_while_its_weights_are_as_loaded():
    with reuse.session():
        first = _tiny()
        assert _tiny() is first
        with torch.no_grad():
            next(first.parameters()).add_(1.0)
        assert _tiny() is not first  # edited and not restored: loaded again


def test_replay_leaves_the_rng_as_the_computation_did():
    def draw():
        torch.manual_seed(3)
        return torch.randn(4)

    with reuse.session():
        first = reuse.replay("t", ("k",), draw)
        after = torch.randn(2)
        torch.manual_seed(99)
        again = reuse.replay("t", ("k",), draw)
        assert torch.equal(first, again)
        assert torch.equal(torch.randn(2), after)
        assert reuse.hits() == {"t": 1}


def test_nothing_is_kept_outside_a_session_or_with_reuse_off(monkeypatch):
    calls = []
    reuse.memo("t", ("k",), lambda: calls.append(1))
    reuse.memo("t", ("k",), lambda: calls.append(1))
    monkeypatch.setenv("MLPIM_REUSE", "0")
    with reuse.session():
        reuse.memo("t", ("k",), lambda: calls.append(1))
        reuse.memo("t", ("k",), lambda: calls.append(1))
        assert not reuse.enabled()
    assert len(calls) == 4
