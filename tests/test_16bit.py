"""16-bit models against float32 (issue 33): the same pairs patched the same ways, and DAS, in
bfloat16 and float16 as in float32 on the tiny GPT-2, Llama and Gemma 3, and illusion_check on
one float32 direction in both dtypes; and what stays float32 or float64 in a 16-bit model.

The tolerance is in nats, in units of the dtype's epsilon times the largest |END logit| (u):
the END logits are themselves rounded to the dtype, which alone moves a logit difference (two
logits) by up to u; the layers before add about as much again. Measured on 2026-12-07 (2-core
CPU machine, 40 test pairs, mlp_post / resid_post with the kernel and attn_out with the cache
engine, clean / full / random direction / DAS patches): per pair at most 1.48 u, the mean over
the pairs at most 0.12 u. Allowed: 3 u per pair and 0.5 u for the mean. FLDD = 1 − p / c for
mean patched and clean LDs p and c, each within d = 0.5 u, so it may move by at most
d (1 + |1 − FLDD|) / (|c| − d): a tiny random model's clean LD is near 0 (a few hundredths of a
nat), which makes its FLDD ill-conditioned; the nats are what is compared.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REFS, TINY

from mlpim import constants as C
from mlpim.analysis import stats
from mlpim.config import compose
from mlpim.engine.das import DasSettings, train_das
from mlpim.engine.interventions import patched_act, patched_end_logits, patched_end_loss
from mlpim.engine.metrics import logit_diff
from mlpim.engine.patching import full, subspace, work_dtype
from mlpim.experiments.common import model_for, paper_splits
from mlpim.run import run

FAMILIES = ["gpt2", "llama", "gemma3"]
PAIRS = [*TINY, "dataset.n_train_pairs=40", "dataset.n_test_pairs=40"]
SITES = [("mlp_post", "kernel"), ("resid_post", "kernel"), ("attn_out", "cache")]
PER_PAIR, MEAN = 3.0, 0.5  # × eps(dtype) × max |END logit|; measured at most 1.48 and 0.12


def cpu_has(dtype: torch.dtype) -> bool:
    """Whether this CPU's torch multiplies matrices in `dtype`."""
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError:
        return False
    return True


LOW = [
    pytest.param(d, marks=pytest.mark.skipif(not cpu_has(getattr(torch, d)), reason=f"no {d}"))
    for d in ("bfloat16", "float16")
]


def fldd_tolerance(d: float, fldd: float, clean: float) -> float:
    """How far FLDD = 1 − p / c may move when p and c each move by at most d: by
    (|Δp| + |p / c| |Δc|) / |c'| ≤ d (1 + |1 − FLDD|) / (|c| − d)."""
    assert abs(clean) > d, "the clean LD is within the tolerance of 0: FLDD means nothing"
    return d * (1 + abs(1 - fldd)) / (abs(clean) - d)


def lds(model, prepared, setter) -> torch.Tensor:
    """Per-pair patched logit differences, in float64."""
    out = []
    with torch.no_grad():
        for p in prepared:
            logits = patched_end_logits(model, p, setter).double()
            out.append(logit_diff(logits, p.pairs.base.answer, p.pairs.base.other))
    return torch.cat(out)


def measured(arch: str, dtype: str) -> dict[tuple[str, str], dict]:
    """Per site and engine: the test pairs' clean LDs, their LDs under a full patch, a fixed
    random direction and a DAS direction trained (3 epochs, seed 0) in this dtype, and the
    largest |clean END logit|."""
    cfg = compose([*PAIRS, f"model.arch={arch}", f"model.dtype={dtype}"])
    model, out = model_for(cfg), {}
    for kind, engine in SITES:
        cfg.method.engine = engine
        splits = paper_splits(cfg, model, kind, 1)
        test = splits["test"]
        d = test[0].base_act.shape[-1]
        v = torch.linalg.qr(torch.randn(d, 1, generator=torch.Generator().manual_seed(1)))[0]
        rot, _ = train_das(model, splits["train"], None, DasSettings(epochs=3), 0, progress=False)
        out[(kind, engine)] = {
            "clean": torch.cat([p.clean_ld for p in test]).double(),
            "full": lds(model, test, full),
            "random": lds(model, test, subspace(v)),
            "das": lds(model, test, rot),
            "scale": max(p.clean_logits.float().abs().max().item() for p in test),
            "engine": test[0].engine,
        }
    return out


@pytest.fixture(scope="module")
def float32():
    """The float32 numbers of each family (`measured`), computed once."""
    return {arch: measured(arch, "float32") for arch in FAMILIES}


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("arch", FAMILIES)
def test_patched_logit_differences_match_float32(float32, arch, dtype):
    eps = torch.finfo(getattr(torch, dtype)).eps
    for site, low in measured(arch, dtype).items():
        ref = float32[arch][site]
        assert low["engine"] == ref["engine"] == site[1]
        u = eps * ref["scale"]
        for patch in ("clean", "full", "random", "das"):
            a, b = ref[patch], low[patch]
            where = f"{arch} {dtype} {site} {patch}"
            assert (a - b).abs().max() <= PER_PAIR * u, where
            assert abs(a.mean() - b.mean()) <= MEAN * u, where
            if patch == "clean":
                continue
            fldd32, fldd16 = (
                1 - x.mean() / c.mean() for x, c in ((a, ref["clean"]), (b, low["clean"]))
            )
            tol = fldd_tolerance(MEAN * u, float(fldd32), float(ref["clean"].mean()))
            assert abs(fldd32 - fldd16) <= tol, where


FLDD_CHECKS = ("effect", "component_vs_subspace", "nullspace_bridging", "random_mlp")
SPREAD = 0.10  # relative; measured at most 3.9% (2026-12-07, the three families)


@pytest.mark.parametrize("arch", FAMILIES)
def test_illusion_check_in_bfloat16_matches_float32(arch, tmp_path):
    """One float32 direction checked on the model in float32 and in bfloat16 (`fingerprint_bf16`
    lets it): the checks that are FLDDs agree within the FLDD tolerance, the ones that are
    statistics of the activations within 10% (off_distribution, net of the whole-site patch's
    distance, within 10% of the raw distance: both raw distances within 10%). Not compared: generalisation, a ratio of two
    FLDDs near 0 on a random model; alignment, not measured without a residual direction."""
    given = [*PAIRS, f"model.arch={arch}", "method.epochs=2"]
    run(compose(["experiment=ioi_mlp8_das", *given]), tmp_path / "mlp")
    check = [*given, *REFS, "extra.reference_cache=null"]
    check += [f"direction={tmp_path / 'mlp' / C.DIRECTION}"]
    frames = {
        dtype: run(
            compose(["experiment=illusion_check", *check, f"model.dtype={dtype}"]), tmp_path / dtype
        )
        for dtype in ("float32", "bfloat16")
    }
    values = pd.DataFrame(
        {
            k: df[df.metric == "check_value"].set_index("intervention").value
            for k, df in frames.items()
        }
    )
    clean, scale = clean_test(given)
    u = torch.finfo(torch.bfloat16).eps * scale
    for name in FLDD_CHECKS:
        a, b = values.loc[name]
        assert abs(a - b) <= fldd_tolerance(MEAN * u, a, clean), (name, a, b)
    raw = pd.DataFrame(
        {
            k: df[df.metric == "off_distance"].set_index("intervention").value
            for k, df in frames.items()
        }
    )
    for part in ("das", "full"):  # the raw distances, in natural sd
        a, b = raw.loc[part]
        assert abs(a - b) <= SPREAD * abs(a), ("off_distance", part, a, b)
    a, b = values.loc["dormant_row_part"]
    assert abs(a - b) <= SPREAD * abs(a), ("dormant_row_part", a, b)
    a, b = values.loc["off_distribution"]  # net of the whole-site patch: the raw ones' scale
    assert abs(a - b) <= SPREAD * abs(raw.loc["das", "float32"]), ("off_distribution", a, b)


def clean_test(given: list[str]) -> tuple[float, float]:
    """The float32 model's mean clean LD on the check's test pairs, and its largest |END logit|."""
    cfg = compose(given)
    test = paper_splits(cfg, model_for(cfg), "mlp_post", 1)["test"]
    clean = torch.cat([p.clean_ld for p in test]).double().mean().item()
    return clean, max(p.clean_logits.float().abs().max().item() for p in test)


def test_what_stays_float32_or_float64_in_a_bfloat16_model():
    """docs/engine.md, 16-bit models: the forward, the prepared activations, logits and per-pair
    LDs and DAS's loss in the model's dtype; DAS's parameters, their gradients and Adam's state,
    directions and the projection in float32; the statistics in float64."""
    low = torch.bfloat16
    cfg = compose([*PAIRS, "model.dtype=bfloat16"])
    model = model_for(cfg)
    assert {p.dtype for p in model.parameters()} == {low}
    train = paper_splits(cfg, model, "mlp_post", 1)["train"]
    p = train[0]
    assert p.engine == "kernel"
    assert p.base_act.dtype == p.source_act.dtype == p.clean_logits.dtype == p.clean_ld.dtype == low
    assert {k.dtype for k in p.state.keys.values()} == {low}
    rot, _ = train_das(model, train, None, DasSettings(epochs=1), 0, progress=False)
    assert rot.basis.dtype == torch.float32 and work_dtype(p.base_act) == torch.float32
    opt = torch.optim.Adam(rot.parameters())
    loss = patched_end_loss(model, p, rot)
    assert loss.dtype == low  # the fused loss runs in the hidden state's dtype
    loss.backward()
    opt.step()
    assert {q.grad.dtype for q in rot.parameters()} == {torch.float32}
    assert {t.dtype for s in opt.state.values() for t in s.values() if t.ndim} == {torch.float32}
    b, s, v = p.base_act.float(), p.source_act.float(), rot.basis.detach()
    want = (b + ((s - b) @ v) @ v.T).to(low)  # computed in float32, rounded once when written
    assert torch.equal(patched_act(p, lambda x, y: rot(x, y).detach()), want)
    ld = lds(model, train, rot)
    clean = torch.cat([q.clean_ld for q in train])
    idx = stats.resample(len(ld), 8, 0)
    assert stats.fldd_est(ld, clean, idx).boot.dtype == np.float64
    assert stats.tensor_np(clean).dtype == np.float64


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kept_preparations_are_checked_on_the_first_batch_whole_in_16_bits(dtype, monkeypatch):
    """In 16 bits a batch's shape moves its values past the tolerance (SmolLM2 in bfloat16: the
    check of every kept preparation failed on its first 4 pairs, while the whole first batch
    prepared again is the same to the bit), so the check of a kept preparation prepares the whole
    first batch again; in float32 its first 4 pairs."""
    from mlpim.engine import interventions as I

    cfg = compose([*PAIRS, "model.arch=gpt2", f"model.dtype={dtype}"])
    model = model_for(cfg)
    kept = paper_splits(cfg, model, "mlp_post", 1)["test"]
    sizes, prepare_sites = [], I.prepare_sites
    monkeypatch.setattr(
        I, "prepare_sites", lambda m, pb, *a: sizes.append(len(pb)) or prepare_sites(m, pb, *a)
    )
    assert I.agrees(model, kept, "mlp_post", 1)
    assert sizes == [len(kept[0].pairs) if dtype == "bfloat16" else 4]
    assert len(kept[0].pairs) > 4
