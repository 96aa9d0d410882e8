"""fact_patching / fact_editing: batched per-pair DAS, the rank-1 W_out edit, end-to-end runs."""

from __future__ import annotations

from dataclasses import fields, replace

import pandas as pd
import pytest
import torch

from mlpim.analysis import editing as ED
from mlpim.analysis import fact_das as FD
from mlpim.analysis import nullspace as ns
from mlpim.config import compose
from mlpim.engine.batch import PairBatch, PromptBatch
from mlpim.engine.interventions import prepare
from mlpim.engine.models import hook_name
from mlpim.engine.patching import at, patch_hook
from mlpim.preflight import preflight
from mlpim.tasks.facts import fact_task

TINY = [
    "model=tiny",
    "device=cpu",
    "extra.known_only=false",
    "dataset.n_train_pairs=8",
    "dataset.n_test_pairs=6",
    "dataset.batch_size=4",
    "dataset.min_pairs=4",
    "extra.pair_steps=3",
    "method.epochs=1",
]


def _cfg(experiment: str, *more: str, arch: str = "gpt2"):
    return compose([f"experiment={experiment}", *TINY, f"model.arch={arch}", *more])


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    """(cfg, model, fact task) for a tiny model over the fact vocabulary (no known filter)."""
    from mlpim.experiments.common import model_for

    cfg = _cfg("fact_patching", arch=request.param)
    model = model_for(cfg)
    return cfg, model, fact_task(model.tokenizer, cfg.dataset, cfg.seed, None)


def _row(pb: PairBatch, i: int) -> PairBatch:
    """Pair i of a batch as a batch of one."""
    cut = lambda b: replace(b, **{f.name: getattr(b, f.name)[i : i + 1] for f in fields(b)})  # noqa: E731
    return PairBatch(cut(pb.base), cut(pb.source), pb.label[i : i + 1])


def test_configs_compose_and_pass_preflight():
    for name in ("fact_patching", "fact_editing"):
        cfg = compose([f"experiment={name}"])
        assert cfg.runner == name and cfg.dataset.name == "facts"
        assert cfg.site.kind == "mlp_post" and cfg.method.dim == 1
        preflight(cfg)
    with pytest.raises(Exception, match="ignores"):
        preflight(compose(["experiment=fact_patching", "site.layer=3"]), ["site.layer=3"])


def test_layer_grid():
    assert FD.layer_grid(None, 6, 30) == [0, 6, 12, 18, 24]
    assert FD.layer_grid([12, 3, 3], 6, 30) == [3, 12]
    with pytest.raises(Exception, match="within"):
        FD.layer_grid([30], 1, 30)


def test_fact_task_keeps_metadata_in_batch_order(tiny):
    _, model, task = tiny
    test = task.pairs["test"]
    labels = torch.cat([b.label for b in task.batches["test"]]).tolist()
    first = [
        model.tokenizer(" " + p.source_answer, add_special_tokens=False).input_ids[0] for p in test
    ]
    assert labels == first and len(test) == 6
    assert all(p.meta["relation"] and p.meta["subject"] in p.base for p in test)


def test_batched_per_pair_training_equals_one_pair_at_a_time(tiny):
    _, model, task = tiny
    batches = task.batches["test"][:2]  # 4 + 2 pairs: row offsets across batches
    prepared = prepare(model, batches, "mlp_post", 1, "cache")
    init = FD.random_directions(6, model.cfg.d_mlp, seed=7)
    together, losses = FD.train_pair_directions(model, prepared, init, steps=4, lr=0.05)
    alone, i = [], 0
    for pb in batches:
        for j in range(len(pb)):
            one = prepare(model, [_row(pb, j)], "mlp_post", 1, "cache")
            alone.append(FD.train_pair_directions(model, one, init[i : i + 1], 4, 0.05)[0])
            i += 1
    alone = torch.cat(alone)
    assert losses[-1] < losses[0]  # it trains
    assert (together - init).norm(dim=1).min() > 1e-2  # every direction moved
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert torch.allclose(together.norm(dim=1), torch.ones(6), atol=1e-6)


def test_pair_directions_patch_only_their_own_pair(tiny):
    _, model, task = tiny
    prepared = prepare(model, task.batches["test"][:1], "mlp_post", 1, "cache")[0]
    v = FD.random_directions(4, model.cfg.d_mlp, seed=1)
    out = FD.PairDirections(v).select(0, 4)(prepared.base_act, prepared.source_act)
    for i in range(4):
        d = (prepared.source_act[i] - prepared.base_act[i]) @ v[i]
        torch.testing.assert_close(out[i], prepared.base_act[i] + d * v[i])


def test_direction_parts_are_unit_and_split_norm(tiny):
    _, model, _ = tiny
    w_out = ns.mlp_w_out(model, 1)
    v = FD.random_directions(5, model.cfg.d_mlp, seed=2)
    parts = FD.direction_parts(v, w_out)
    (row, rn), (null, nn_) = parts["row"], parts["null"]
    torch.testing.assert_close(rn**2 + nn_**2, torch.ones(5), atol=1e-5, rtol=0)
    assert torch.allclose(row.norm(dim=1), torch.ones(5), atol=1e-5)
    assert (null @ w_out).abs().max() < 1e-4  # the null part writes nothing


def _mlp_out(model, batch: PromptBatch, layer: int, hooks=()) -> torch.Tensor:
    """hook_mlp_out of `layer` over the whole batch."""
    got = {}
    read = lambda act, hook=None: got.setdefault("out", act.detach().clone())  # noqa: E731
    with torch.no_grad():
        model.run_with_hooks(
            batch.tokens,
            attention_mask=batch.mask,
            fwd_hooks=[*hooks, (hook_name("mlp_out", layer), read)],
        )
    return got["out"]


def test_rank_one_edit_equals_patch_at_the_key_only(tiny):
    _, model, task = tiny
    layer, pb = 1, task.batches["test"][0]
    prepared = prepare(model, [pb], "mlp_post", layer, "cache")[0]
    k, k_src = prepared.base_act[:1], prepared.source_act[:1]
    one = _row(pb, 0).base
    v = FD.random_directions(1, model.cfg.d_mlp, seed=3) + (k_src - k) / (k_src - k).norm()
    v = v / v.norm()  # a direction the pair's activations differ along: a visible patch
    cov = torch.eye(model.cfg.d_mlp, dtype=torch.float64) + 0.1  # any SPD C
    b = ED.key_vectors(cov, k)
    w_out = ns.mlp_w_out(model, layer)
    delta = ED.rank_one_delta(w_out, v[0], k[0], k_src[0], b[0])
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5) == 1
    before = model.blocks[layer].mlp.out.weight.detach().clone()
    patch = patch_hook(FD.PairDirections(v), k_src, one.pos)
    patched = _mlp_out(model, one, layer, [(hook_name("mlp_post", layer), patch)])
    effect = (at(patched, one.pos) - at(_mlp_out(model, one, layer), one.pos)).abs().max()
    with ED.edited_w_out(model, layer, delta):
        edited = _mlp_out(model, one, layer)
    assert torch.equal(model.blocks[layer].mlp.out.weight, before)  # restored exactly
    pos = int(one.pos[0])
    torch.testing.assert_close(at(edited, one.pos), at(patched, one.pos), atol=1e-5, rtol=0)
    others = [c for c in range(pos) if one.mask[0, c]]  # the prompt's tokens before the key
    assert effect > 1e-3 and (edited[0, others] - patched[0, others]).abs().max() > 0.1 * effect


def test_regularised_adds_ridge_only_when_singular():
    x = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full_rank = x.T @ x / 50
    assert ED.regularised(full_rank, 1e-3)[1] == 0.0
    low = x[:, :3] @ x[:3]  # [50, 8] of rank 3
    cov, lam = ED.regularised(low.T @ low / 50, 1e-3)
    assert lam > 0 and torch.linalg.eigvalsh(cov).min() > 0


def test_second_moments_match_a_direct_computation(tiny):
    _, model, _ = tiny
    tokens = ED.corpus_tokens(model.tokenizer, None, chunk_len=16, n_tokens=48)
    assert tokens.shape == (3, 17)
    covs, n = ED.second_moments(model, tokens, [0, 1], batch_size=2)
    _, cache = model.run_with_cache(tokens, names_filter=lambda s: s.endswith("mlp.hook_post"))
    h = cache[hook_name("mlp_post", 1)][:, 1:].reshape(-1, model.cfg.d_mlp).double()
    assert n == 48
    torch.testing.assert_close(covs[1], h.T @ h / 48)


def _metrics(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def test_fact_patching_runs_end_to_end(tmp_path):
    from mlpim.run import run

    run(_cfg("fact_patching", "extra.layers=[0,2]"), tmp_path)
    df = _metrics(tmp_path)
    for f in ("summary.md", "flip_rate.png", "history.csv", "shared_L0.pt"):
        assert (tmp_path / f).is_file()
    flips = df[df.metric == "fact_flip"]
    assert set(flips.intervention) >= {"full", "pair_das", "pair_row", "pair_null", "shared_das"}
    assert set(flips.layer) == {0, 2} and flips.value.between(0, 1).all()
    # layer 2 is the tiny model's last: its MLP at the subject token never reaches END
    last = df[(df.layer == 2) & (df.metric == "fldd")]
    assert last.value.abs().max() < 1e-5
    norms = df[(df.metric == "norm_sq") & df.intervention.isin(["pair_row", "pair_null"])]
    assert norms.groupby("layer").value.sum().sub(1).abs().max() < 1e-4
    assert "Fact flip gap" in (tmp_path / "summary.md").read_text()


def test_fact_editing_runs_end_to_end_with_the_same_directions(tmp_path):
    from mlpim.run import run

    layers = "extra.layers=[0,1]"
    more = (layers, "extra.n_cov_tokens=256", "extra.chunk_len=32")
    run(_cfg("fact_patching", layers), tmp_path / "patch")
    run(_cfg("fact_editing", *more), tmp_path / "edit")
    run(_cfg("fact_editing", *more, f"extra.pair_run={tmp_path / 'patch'}"), tmp_path / "reuse")
    patch, edit, reuse = (_metrics(tmp_path / d) for d in ("patch", "edit", "reuse"))
    assert (tmp_path / "edit" / "edit_vs_patch.png").is_file()
    assert (tmp_path / "edit" / "summary.md").is_file()
    got = edit[edit.intervention.isin(["patch", "edit"])]
    assert set(got.layer) == {0, 1}
    assert {"fact_flip", "fldd", "neighbour_acc", "neighbour_acc_change"} <= set(got.metric)
    assert edit[edit.metric == "key_residual"].value.max() < 1e-8  # kᵀb = 1
    pick = lambda d, i: d[(d.intervention == i) & (d.metric == "fldd")].set_index("layer").value  # noqa: E731
    # trained again with the same seeds, or loaded: the per-pair directions of fact_patching
    pd.testing.assert_series_equal(pick(edit, "patch"), pick(patch, "pair_das"), check_names=False)
    pd.testing.assert_series_equal(pick(reuse, "edit"), pick(edit, "edit"), check_names=False)


def test_fact_editing_refuses_directions_of_other_pairs(tmp_path):
    from mlpim.experiments import fact_editing

    run_dir = tmp_path / "patch"
    run_dir.mkdir()
    v = torch.zeros(1, 128)
    torch.save(
        {"layer": 0, "directions": v, "pairs": [("a", "b")], "fingerprint": "x"},
        FD.pair_file(run_dir, 0),
    )
    cfg = _cfg("fact_editing", "extra.layers=[0]", f"extra.pair_run={run_dir}")
    with pytest.raises(Exception, match="other weights"):
        fact_editing.run(cfg, tmp_path / "edit", {})
    with pytest.raises(Exception, match="no pair_directions_L1.pt"):
        fact_editing.run(
            _cfg("fact_editing", "extra.layers=[1]", f"extra.pair_run={run_dir}"),
            tmp_path / "edit2",
            {},
        )


@pytest.mark.slow
def test_fact_patching_on_smollm2_short_grid(tmp_path, smollm2, monkeypatch):
    from mlpim.experiments import fact_patching

    monkeypatch.setattr(fact_patching, "model_for", lambda cfg: smollm2)  # loaded once

    cfg = compose(
        [
            "experiment=fact_patching",
            "device=cpu",
            "extra.layers=[12]",
            "dataset.n_test_pairs=20",
            "dataset.n_train_pairs=40",
            "extra.pair_steps=20",
            "method.epochs=2",
        ]
    )
    df = fact_patching.run(cfg, tmp_path, {})  # ~70-120 s on 2 CPU cores
    test = df[df.split == "test"]
    fldd = test[test.metric == "fldd"].set_index("intervention").value
    # measured (10 steps): per-pair FLDD 0.68 vs full MLP 0.04; the paper: the patch flips facts
    assert fldd["pair_das"] > 0.5 and fldd["pair_das"] > fldd["full"] + 0.3
    flip = test[test.metric == "fact_flip"].set_index("intervention").value
    assert flip.between(0, 1).all() and {"shared_das", "pair_row", "pair_null"} <= set(flip.index)
    assert (tmp_path / "flip_rate.png").is_file()
