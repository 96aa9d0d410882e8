"""The random-MLP reference, faster: its seeds trained as one batched problem (golden against
separate runs), DAS runs that stop once converged, and one preparation of the pairs shared with
the direction's checks (tiny models; issue 33)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import PROBE, SMALL, assert_one_line_error, cli

from mlpim.analysis import controls
from mlpim.analysis import references as R
from mlpim.config import compose
from mlpim.engine import interventions, patching
from mlpim.engine.das import DasSettings, converged, fit
from mlpim.engine.fastpath import EndState
from mlpim.engine.interventions import (
    evaluate,
    patched_end_loss,
    patched_end_losses,
    prepare,
    prepare_sites,
)
from mlpim.engine.subspace import RotatedSubspace
from mlpim.experiments.common import das_settings
from mlpim.tasks.ioi import paper_pairs

LAYER = 1
CFG = compose(SMALL)  # 40 train and 20 test pairs
SEEDS = [0, 1, 2]
# Batched against separate runs: the resume over S·b rows runs its matmuls at another shape
# than over b rows, so BLAS adds in another order (float32 rounding, ~1e-7 a step). Measured on
# these models: FLDD within 3e-6 after 30 epochs, train losses within 1.2e-6.
FLDD_TOL = 1e-5
LOSS_TOL = 1e-5
CASES = [("tiny_gpt2", "auto"), ("tiny_gemma3", "auto"), ("tiny_llama", "cache")]


@pytest.fixture(params=CASES, ids=["-".join(c) for c in CASES])
def case(request):
    name, engine = request.param
    return request.getfixturevalue(name), engine


def splits(model, engine: str = "auto") -> dict:
    """The paper's train and test pairs prepared at mlp_post of LAYER."""
    batches = {s: paper_pairs(model.tokenizer, CFG.dataset, s, CFG.seed) for s in ("train", "test")}
    return {s: prepare(model, b, "mlp_post", LAYER, engine) for s, b in batches.items()}


def grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


@pytest.mark.parametrize("engine", ["kernel", "cache", "cache_logits", "full"])
@pytest.mark.parametrize("mid", [False, True])
def test_losses_of_many_setters_equal_each_alone(tiny_gemma3, engine, mid, monkeypatch):
    """One resume over the rows repeated per setter gives each setter its own loss and
    gradient (each engine, the cache engine also through the logits, as where the unembedding
    is not linear; a patch at END and, where the engine can, mid-prompt)."""
    if mid and engine == "kernel":
        pytest.skip("the kernel patches at END only")
    if engine == "cache_logits":
        monkeypatch.setattr(interventions, "linear_unembed", lambda model, prep: False)
        engine = "cache"
    pb = paper_pairs(tiny_gemma3.tokenizer, CFG.dataset, "train", CFG.seed)[0]
    if mid:
        pb = replace(pb, base=replace(pb.base, pos=pb.base.pos - 2))
    prep = prepare_sites(tiny_gemma3, pb, [("mlp_post", LAYER)], engine)[("mlp_post", LAYER)]
    m = prep.base_act.shape[-1]
    rots = [RotatedSubspace(m, 2, torch.Generator().manual_seed(s)) for s in SEEDS]
    losses = patched_end_losses(tiny_gemma3, prep, rots)
    losses.sum().backward()
    together = [grads(r) for r in rots]
    for rot, loss, grad in zip(rots, losses, together, strict=True):
        rot.zero_grad()
        alone = patched_end_loss(tiny_gemma3, prep, rot)
        alone.backward()
        assert abs(loss.item() - alone.item()) <= LOSS_TOL
        assert ((grad - grads(rot)).norm() / grads(rot).norm()).item() <= 1e-4
    assert len({round(v, 4) for v in losses.tolist()}) == len(SEEDS)  # three different problems


def trained(model, aug: dict, method: DasSettings) -> tuple[list, list, list, list]:
    """Random-MLP DAS of each seed, batched and separately (same init, same batch order):
    test FLDDs and histories of both."""
    mid, out = controls.split_acts(aug["train"], model.cfg.d_model)
    mlps = [controls.matched_random_mlp(model, mid, out, s) for s in SEEDS]
    patches, hists = controls.train_random_das_many(
        model, aug["train"], LAYER, mlps, method, SEEDS, progress=False
    )
    batched = [evaluate(model, aug["test"], p)["fldd"] for p in patches]
    alone, alone_hists = [], []
    for mlp, seed in zip(mlps, SEEDS, strict=True):
        torch.manual_seed(seed)
        patch = controls.RandomMLPPatch(mlp, method.dim, torch.Generator().manual_seed(seed))
        order = torch.Generator().manual_seed(SEEDS[0])  # the batched run's one order
        alone_hists.append(fit(model, aug["train"], None, patch, method, order, progress=False))
        alone.append(evaluate(model, aug["test"], patch)["fldd"])
    return batched, alone, hists, alone_hists


def test_batched_random_mlp_das_equals_separate_runs(case):
    """The golden test: S random MLPs trained as one problem give each seed the FLDD and the
    loss history of its own run, within float rounding (FLDD_TOL)."""
    model, engine = case
    aug = controls.augmented_splits(model, splits(model, engine), LAYER)
    batched, alone, hists, alone_hists = trained(model, aug, DasSettings(epochs=6))
    for a, b, ha, hb in zip(batched, alone, hists, alone_hists, strict=True):
        assert abs(a - b) <= FLDD_TOL, (batched, alone)
        assert len(ha) == len(hb) == 6
        assert (ha.train_loss - hb.train_loss).abs().max() <= LOSS_TOL
    assert max(batched) - min(batched) > 100 * FLDD_TOL  # the seeds differ: a test that can fail


def test_batched_runs_stop_where_separate_runs_stop(tiny_gemma3):
    """With early stopping, each seed stops at the epoch its own run stops at (here the seeds
    stop at different epochs; no gain lies within 2% of the tolerance)."""
    aug = controls.augmented_splits(tiny_gemma3, splits(tiny_gemma3), LAYER)
    method = DasSettings(epochs=8, stop_tol=5e-4, stop_patience=2)
    batched, alone, hists, alone_hists = trained(tiny_gemma3, aug, method)
    for a, b, ha, hb in zip(batched, alone, hists, alone_hists, strict=True):
        assert abs(a - b) <= FLDD_TOL
        assert list(ha.converged) == list(hb.converged)
        assert len(ha) < 8 and ha.converged.iloc[-1]
    assert len({len(h) for h in hists}) > 1


def test_converged_rule():
    """Converged: `stop_patience` epochs in a row each improve by less than `stop_tol`."""
    method = DasSettings(stop_tol=0.005, stop_patience=3)
    falling = [3.0 * 0.9**e for e in range(30)]  # 10% better every epoch
    assert not any(converged(falling[: e + 1], method) for e in range(30))
    plateau = [3.0, 2.5, 2.49, 2.495, 2.494]  # gains 0.4%, -0.2% (a rise), 0.04%
    assert converged(plateau, method)
    assert not converged(plateau[:4], method)  # only two small gains yet
    assert not converged(plateau, replace(method, stop_patience=4))  # 2.5 -> 2.49 was 17%
    assert not converged(plateau, replace(method, stop_tol=0.0))  # 0: never stops


def test_fit_stops_once_converged_and_says_where(tiny_gpt2):
    """A run that converges stops and marks the epoch; one that does not runs every epoch; and
    without `stop_tol` the history is as before (no converged column)."""
    train = splits(tiny_gpt2)["train"]
    m = train[0].base_act.shape[-1]

    def history(method: DasSettings):
        rot = RotatedSubspace(m, 1, torch.Generator().manual_seed(0))
        return fit(tiny_gpt2, train, None, rot, method, torch.Generator().manual_seed(0), "", False)

    stops = history(DasSettings(epochs=10, stop_tol=1.0, stop_patience=2))  # any gain < 100%
    assert list(stops.epoch) == [0, 1, 2] and list(stops.converged) == [False, False, True]
    runs = history(DasSettings(epochs=4, stop_tol=1e-9, stop_patience=4))
    assert list(runs.epoch) == [0, 1, 2, 3] and not runs.converged.any()
    plain = history(DasSettings(epochs=4))
    assert list(plain.columns) == ["epoch", "train_loss"]


def test_shared_preparation_equals_a_second_one_and_holds_nothing_twice(case, monkeypatch):
    """The reference's pairs at mlp_out, derived from the mlp_post preparation, equal the pairs
    prepared again (today's `reference_mode=serial` path) to the bit, share its state and END
    logits, and need only the forward passes that read resid_mid: the second preparation's
    passes are gone."""
    model, engine = case
    prepared = splits(model, engine)
    runs = []
    real = patching.cached_run
    monkeypatch.setattr(patching, "cached_run", lambda *a, **k: runs.append(1) or real(*a, **k))

    def count(make):
        runs.clear()
        return make(), len(runs)

    again, n_again = count(lambda: R.serial_splits(model, prepared, LAYER))
    shared, n_shared = count(lambda: controls.augmented_splits(model, prepared, LAYER))
    pairs = {s: [p.pairs for p in ps] for s, ps in prepared.items()}
    _, n_prepare = count(
        lambda: [prepare(model, b, "mlp_out", LAYER, engine) for b in pairs.values()]
    )
    assert n_again == n_prepare + n_shared and n_shared > 0
    for split, batches in shared.items():
        for a, b, p in zip(batches, again[split], prepared[split], strict=True):
            assert a.name == b.name == "blocks.1.hook_mlp_out" and a.engine == b.engine
            assert torch.equal(a.base_act, b.base_act) and torch.equal(a.source_act, b.source_act)
            assert a.clean_logits is p.clean_logits and b.clean_logits is not p.clean_logits
            if isinstance(p.state, EndState):
                assert a.state.kind == "mlp_out" and a.state.keys[2] is p.state.keys[2]
            else:
                assert a.state is p.state


def test_reads_taken_with_the_preparation_run_no_prompt_again(case, monkeypatch):
    """Prepared with `also=mlp_reads(LAYER)` (as `mlpim check` prepares an MLP site), the
    reference's pairs at mlp_out run no forward pass, and equal the ones read by running again:
    to the bit where the preparation runs rows grouped by length as the second run does (kernel
    and full engines), within float32 rounding for the cache engine, whose base run is the whole
    batch at once."""
    model, engine = case
    batches = {s: [p.pairs for p in ps] for s, ps in splits(model, engine).items()}
    also = controls.mlp_reads(LAYER)
    with_reads = {s: prepare(model, b, "mlp_post", LAYER, engine, also) for s, b in batches.items()}
    plain = {s: prepare(model, b, "mlp_post", LAYER, engine) for s, b in batches.items()}
    runs = []
    real = patching.cached_run
    monkeypatch.setattr(patching, "cached_run", lambda *a, **k: runs.append(1) or real(*a, **k))
    shared = controls.augmented_splits(model, with_reads, LAYER)
    assert runs == []
    again = controls.augmented_splits(model, plain, LAYER)
    assert runs
    exact = with_reads["train"][0].engine != "cache"
    for split, batches_ in shared.items():
        for a, b in zip(batches_, again[split], strict=True):
            for x, y in ((a.base_act, b.base_act), (a.source_act, b.source_act)):
                assert torch.equal(x, y) if exact else torch.allclose(x, y, atol=1e-5, rtol=1e-5)
    p, q = with_reads["test"][0], plain["test"][0]
    assert torch.equal(p.base_act, q.base_act) and torch.equal(p.clean_logits, q.clean_logits)


class DictStore(dict):
    def put(self, key: str, value: dict) -> None:
        self[key] = value


def test_reference_is_kept_with_the_epochs_its_runs_took(tiny_gpt2):
    """Cold: trained (batched), kept with each seed's epochs; warm: the same reference, name
    included; the serial mode is another key."""
    prepared, store = splits(tiny_gpt2), DictStore()
    method = DasSettings(epochs=6, stop_tol=1.0, stop_patience=2)
    cold, hist = R.random_mlp_reference(tiny_gpt2, prepared, LAYER, method, range(2), store)
    assert sorted(hist) == [0, 1] and [len(h) for h in hist.values()] == [3, 3]
    assert cold.name == "random-MLP DAS (2 seeds, 3 of 6 epochs, stopped once converged)"
    warm, none = R.random_mlp_reference(tiny_gpt2, prepared, LAYER, method, range(2), store)
    assert warm == cold and none == {}
    args = (tiny_gpt2, prepared, LAYER, method, range(2))
    assert R.reference_key(*args, mode="serial") != R.reference_key(*args)


@pytest.mark.parametrize(
    ("early_stop", "direction", "reference"),
    [("reference", 0.0, 0.005), ("all", 0.005, 0.005), ("none", 0.0, 0.0)],
)
def test_early_stop_applies_where_the_config_says(early_stop, direction, reference):
    """The default stops the random-MLP reference's runs only; the direction's DAS trains every
    epoch unless `method.early_stop=all`."""
    cfg = compose([*SMALL, f"method.early_stop={early_stop}"])
    assert das_settings(cfg).stop_tol == direction
    assert das_settings(cfg, reference=True).stop_tol == reference


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("method.early_stop=sometimes", ["method.early_stop=sometimes", "none, reference, all"]),
        ("method.stop_tol=-1", ["method.stop_tol=-1", "0 or more"]),
        ("method.stop_patience=0", ["method.stop_patience=0", "at least 1"]),
        ("extra.reference_mode=fast", ["extra.reference_mode=fast", "batched, serial"]),
    ],
)
def test_bad_settings_are_one_line(override, needles, tmp_path, capsys):
    torch.save(torch.ones(128) / 128**0.5, tmp_path / "v.pt")
    args = ["experiment=illusion_check", *PROBE, f"direction={tmp_path}/v.pt", override]
    args += ["direction_site=mlp_post", "direction_layer=1"]
    assert_one_line_error(*cli(capsys, "run", *args, f"hydra.run.dir={tmp_path}/r"), *needles)
    assert not (tmp_path / "r").exists()
