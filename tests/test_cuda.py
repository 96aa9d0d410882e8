"""On a CUDA device (issue 33): the tiny families give the CPU's numbers (golden, float32 on
both), DAS trains to the CPU's direction, `mlpim check` runs end to end in the dtype `auto`
gives, the preflight's memory estimate bounds the peak allocated on the GPU, and
`model.device_map=auto` gives one GPU's numbers. Every test is marked `cuda` and skips, with its
reason, where torch sees no CUDA device (tests/conftest.py); scripts/device_check.sh runs them
on a lent GPU.

Tolerances: float32 on a GPU sums in another order than on the CPU (and torch keeps TF32 off for
float32 matrix products by default), so logits agree to a few float32 ulps of their size; 1e-4 of
the largest |logit| is the engine tests' tolerance (tests/test_engine.py). DAS follows the same
gradients from the same basis and the same batch order; its basis may drift by that rounding
over 3 epochs: |cos| ≥ 1 − 1e-3.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REFS, TINY, mlpim_process

from mlpim import constants as C
from mlpim.config import compose
from mlpim.engine import memory
from mlpim.engine.das import DasSettings, train_das
from mlpim.engine.interventions import patched_end_logits
from mlpim.engine.metrics import logit_diff
from mlpim.engine.patching import full, subspace
from mlpim.experiments.common import model_for, paper_splits
from mlpim.preflight import model_shape, workload
from mlpim.run import run

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
PAIRS = ["model=tiny", "dataset.n_train_pairs=40", "dataset.n_test_pairs=40"]
SITES = [("mlp_post", "kernel"), ("resid_post", "kernel"), ("attn_out", "cache")]
FAMILIES = ["gpt2", "llama", "gemma3", "qwen2", "neox"]  # the last two: the cache engine only
LOGIT_TOL, COS_TOL = 1e-4, 1e-3


def lds(model, prepared, setter) -> torch.Tensor:
    """Per-pair patched logit differences, float64 on the CPU."""
    out = []
    with torch.no_grad():
        for p in prepared:
            logits = patched_end_logits(model, p, setter).double()
            out.append(logit_diff(logits, p.pairs.base.answer, p.pairs.base.other).cpu())
    return torch.cat(out)


def on(device: str, arch: str, kind: str, engine: str) -> dict:
    """Clean LDs, full-patch, fixed-direction and DAS LDs (3 epochs, seed 0) and the DAS basis
    at (kind, 1) of the tiny `arch` in float32 on `device`."""
    cfg = compose([*PAIRS, f"model.arch={arch}", f"device={device}", "model.dtype=float32"])
    cfg.method.engine = engine
    model = model_for(cfg)
    splits = paper_splits(cfg, model, kind, 1)
    test = splits["test"]
    d = test[0].base_act.shape[-1]
    v = torch.linalg.qr(torch.randn(d, 1, generator=torch.Generator().manual_seed(1)))[0]
    rot, _ = train_das(model, splits["train"], None, DasSettings(epochs=3), 0, progress=False)
    return {
        "engine": test[0].engine,
        "scale": max(p.clean_logits.abs().max().item() for p in test),
        "clean": torch.cat([p.clean_ld.double().cpu() for p in test]),
        "full": lds(model, test, full),
        "fixed": lds(model, test, subspace(v)),
        "das": lds(model, test, rot),
        "basis": rot.basis.detach().cpu(),
        "model": model,
        "test": test,
    }


@pytest.mark.parametrize("kind, engine", SITES)
@pytest.mark.parametrize("arch", FAMILIES)
def test_gpu_gives_the_cpu_s_numbers(arch, kind, engine):
    if engine == "kernel" and arch in ("qwen2", "neox"):
        pytest.skip(f"the kernel does not run {arch} (engine auto takes the cache engine)")
    cpu, gpu = on("cpu", arch, kind, engine), on(DEVICE, arch, kind, engine)
    assert cpu["engine"] == gpu["engine"] == engine
    assert gpu["test"][0].base_act.device.type == torch.device(DEVICE).type
    tol = LOGIT_TOL * cpu["scale"]
    for patch in ("clean", "full", "fixed"):
        assert (cpu[patch] - gpu[patch]).abs().max() <= tol, (arch, kind, patch)
    cos = (cpu["basis"] * gpu["basis"]).sum().abs().item()
    assert cos >= 1 - COS_TOL, (arch, kind, cos)
    # the CPU's DAS direction patched on the GPU: the CPU's LDs
    on_gpu = lds(gpu["model"], gpu["test"], subspace(cpu["basis"].to(DEVICE)))
    assert (on_gpu - cpu["das"]).abs().max() <= tol, (arch, kind)


def test_auto_dtype_on_cuda_is_bfloat16_where_the_card_has_it():
    model = model_for(compose([*TINY[:1], f"device={DEVICE}"]))
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert {p.dtype for p in model.parameters()} == {want}
    assert {p.device.type for p in model.parameters()} == {torch.device(DEVICE).type}


def test_check_runs_end_to_end_on_cuda(tmp_path):
    """`mlpim run` finds a direction on the GPU and `mlpim check` checks it there, both in the
    dtype `auto` gives (bfloat16 on a card that has it), as a user would run them."""
    small = ["model=tiny", f"device={DEVICE}", "dataset.n_train_pairs=40"]
    small += ["dataset.n_test_pairs=20", "method.epochs=2"]
    found = mlpim_process(["run", "experiment=ioi_mlp8_das", *small], tmp_path)
    assert found.returncode == 0, found.stdout + found.stderr
    (direction,) = tmp_path.glob(f"outputs/ioi_mlp8_das/*/{C.DIRECTION}")
    checked = mlpim_process(["check", str(direction), *small, *REFS], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (verdict,) = tmp_path.glob(f"outputs/illusion_check/*/{C.VERDICT}")
    assert verdict.read_text().startswith("# illusion_check: ")
    dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    log = (verdict.parent / C.LOG).read_text()
    assert f"({DEVICE}, {dtype})" in log, log[-2000:]


def test_memory_estimate_bounds_the_peak_on_cuda(tmp_path, record_property):
    """The preflight's estimate (weights, prepared pairs, a forward, natural activations; the
    libraries are host memory) against torch.cuda.max_memory_allocated over a whole check."""
    direction = tmp_path / "mlp" / C.DIRECTION
    small = [*PAIRS[:1], f"device={DEVICE}", "dataset.n_train_pairs=40", "method.epochs=2"]
    run(compose(["experiment=ioi_mlp8_das", *small]), tmp_path / "mlp")
    cfg = compose(["experiment=illusion_check", *small, *REFS, f"direction={direction}"])
    dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    need = memory.estimate(model_shape(cfg, None), memory.DTYPE_BYTES[dtype], workload(cfg))
    on_gpu = sum(v for k, v in need.items() if k != "libraries")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run(cfg, tmp_path / "check")
    peak = torch.cuda.max_memory_allocated()
    record_property("memory", json.dumps({"estimate": need, "peak_allocated": peak}))
    assert peak <= on_gpu, (peak, need)


def placed_numbers(device_map) -> dict[str, torch.Tensor]:
    """Clean and full-patch LDs at mlp_post L1 (kernel) of the tiny Llama on the GPU, loaded
    plainly (None) or placed by `device_map`."""
    place = (
        ["device=auto", f"model.device_map={device_map}"] if device_map else [f"device={DEVICE}"]
    )
    cfg = compose([*PAIRS, "model.arch=llama", "model.dtype=float32", *place])
    model = model_for(cfg)
    test = paper_splits(cfg, model, "mlp_post", 1)["test"]
    return {
        "devices": {p.device.type for p in model.parameters()},
        "clean": torch.cat([p.clean_ld.double().cpu() for p in test]),
        "full": lds(model, test, full),
    }


def test_device_map_auto_gives_one_gpu_s_numbers():
    plain, placed = placed_numbers(None), placed_numbers("auto")
    assert placed["devices"] == {torch.device(DEVICE).type}
    for key in ("clean", "full"):
        torch.testing.assert_close(placed[key], plain[key], rtol=0, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_split_over_two_gpus_gives_one_gpu_s_numbers():
    """Blocks 0-1 on GPU 0, block 2 and the head on GPU 1: the kernel moves the END residual
    from block to block."""
    split = "{model.embed_tokens:0,model.layers.0:0,model.layers.1:0,model.layers.2:1,"
    split += "model.norm:1,model.rotary_emb:1,lm_head:1}"
    plain, placed = placed_numbers(None), placed_numbers(split)
    scale = plain["clean"].abs().max().item()
    for key in ("clean", "full"):
        assert (placed[key] - plain[key]).abs().max() <= LOGIT_TOL * max(scale, 1.0)
