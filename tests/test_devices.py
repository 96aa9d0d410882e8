"""Where a model runs (issue 33): `model.dtype=auto` (bfloat16 on a CUDA card that has it,
float32 elsewhere), `model.device_map` (accelerate's placement; on this CPU machine only the
all-CPU maps, which must give the plain load's numbers), the helpers that take an activation to
the device of the weights it meets, and a float32 direction checked on a bfloat16 model."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers import FAST, TINY
from torch import nn

from mlpim import constants as C
from mlpim.config import compose
from mlpim.engine import fastpath
from mlpim.engine.das import DasSettings, train_das
from mlpim.engine.direction import load_direction
from mlpim.engine.interventions import evaluate, prepare
from mlpim.engine.models import block_device, load_model, module_device, place, resolve_dtype
from mlpim.engine.patching import full
from mlpim.errors import ConfigError, MlpimError
from mlpim.experiments.common import model_for, model_spec
from mlpim.preflight import placement, preflight
from mlpim.run import run
from mlpim.tasks import task_vocabulary
from mlpim.tasks.ioi import paper_pairs


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16_card", "older_card"])
def test_auto_dtype_is_bfloat16_on_a_cuda_card_that_has_it(bf16, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    want = "bfloat16" if bf16 else "float32"
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == want
    assert resolve_dtype("auto", "cpu") == resolve_dtype("auto", "mps") == "float32"
    for given in ("float32", "bfloat16", "float16", "float64"):
        assert resolve_dtype(given, "cuda") == resolve_dtype(given, "cpu") == given


def test_auto_dtype_keeps_the_cpu_in_float32():
    cfg = compose(TINY)
    assert cfg.model.dtype == "auto"
    assert {p.dtype for p in model_for(cfg).parameters()} == {torch.float32}


def test_preflight_estimates_memory_in_the_dtype_auto_resolves_to(monkeypatch):
    """device=auto on a (mocked) CUDA machine with bfloat16: the estimate is bfloat16's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("MLPIM_MEMORY_BUDGET", "1MiB")
    with pytest.raises(MlpimError, match=r"tiny \(bfloat16\) needs about"):
        preflight(compose(["model=tiny", "experiment=ioi_mlp8_das"]))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(MlpimError, match=r"tiny \(float32\) needs about"):
        preflight(compose(["model=tiny", "experiment=ioi_mlp8_das"]))


def test_the_memory_check_counts_every_device_of_the_map(monkeypatch):
    """A map's devices, each once (cuda, 0 and cuda:0 are one GPU); auto: every GPU, else the
    CPU."""
    given = compose(["model=tiny", "model.device_map={a:cuda,b:0,c:1,d:cuda:1}"])
    assert placement(given) == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert placement(compose(["model=tiny", "model.device_map=auto"])) == ["cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert placement(compose(["model=tiny", "model.device_map=auto"])) == ["cuda:0", "cuda:1"]


def test_device_helpers_name_the_device_of_the_weights():
    """The helper takes an activation to its block's device: the device of the block's own
    parameters (here one block on cpu, one on meta), else of its buffers, else the CPU."""
    model = SimpleNamespace(blocks=[nn.Linear(2, 2), nn.Linear(2, 2, device="meta")])
    assert block_device(model, 0) == torch.device("cpu")
    assert block_device(model, 1) == torch.device("meta")
    norm = nn.BatchNorm1d(2, affine=False).to("meta")  # buffers only
    assert module_device(norm) == torch.device("meta")
    assert module_device(nn.ReLU()) == torch.device("cpu")


def test_sliding_window_mask_is_built_on_the_mask_s_device(tiny_gemma3):
    """Gemma 3's window mask was built on the CPU whatever the batch's device (it failed on a
    GPU); a mask on meta shows where it is built."""
    assert fastpath.family_of(tiny_gemma3).windows[0] == 4
    keep = torch.ones(2, 6, dtype=torch.bool, device="meta")
    state = fastpath.EndState("resid_post", 0, None, None, {}, {}, None, keep)
    assert fastpath.key_mask(tiny_gemma3, 0, state).device == torch.device("meta")


CPU_MAPS = [
    {"": "cpu"},
    {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_an_all_cpu_device_map_gives_the_plain_load_s_numbers(arch):
    """The model dispatched by accelerate (`place`) prepares, patches and trains DAS to the
    same numbers, bit for bit, as the plain load (kernel and cache engines)."""
    cfg = compose([*TINY, f"model.arch={arch}"])
    spec, vocab = model_spec(cfg), task_vocabulary(cfg.dataset)
    maps = CPU_MAPS if arch != "gpt2" else [{"": "cpu"}, {"transformer": "cpu", "lm_head": "cpu"}]
    plain = numbers(load_model(spec, "cpu", vocab), cfg)
    for device_map in maps:
        placed = load_model(replace(spec, device_map=device_map), "cpu", vocab)
        assert placed.original_model.hf_device_map == device_map
        assert str(placed.cfg.device) == "cpu"
        got = numbers(placed, cfg)
        for key, value in plain.items():
            assert torch.equal(value, got[key]), (arch, device_map, key)


def numbers(model, cfg) -> dict[str, torch.Tensor]:
    """Clean logits, full-patch FLDD and a 1-epoch DAS basis at mlp_post L1, per engine."""
    batches = paper_pairs(model.tokenizer, cfg.dataset, "train", cfg.seed)[:2]
    out = {}
    for engine in ("kernel", "cache"):
        prepared = prepare(model, batches, "mlp_post", 1, engine)
        rot, _ = train_das(model, prepared, None, DasSettings(epochs=1), 0, progress=False)
        out[f"{engine} clean"] = torch.cat([p.clean_logits for p in prepared])
        out[f"{engine} fldd"] = torch.tensor(evaluate(model, prepared, full)["fldd"])
        out[f"{engine} das"] = rot.basis.detach()
    return out


def test_device_map_auto_runs_end_to_end_as_the_plain_load(tmp_path):
    """`model.device_map=auto` on a machine without a GPU: accelerate maps every module to the
    CPU, and the run's metrics are the plain run's."""
    given = ["experiment=ioi_mlp8_das", *FAST]
    run(compose(given), tmp_path / "plain")
    run(compose([*given, "device=auto", "model.device_map=auto"]), tmp_path / "map")
    a, b = (pd.read_csv(tmp_path / d / C.METRICS) for d in ("plain", "map"))
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.device_map={transformer:disk,lm_head:cpu}"], "'disk' is not a device"),
        (["model.device_map={transformer:meta}"], "'meta' is not a device"),
        (["model.device_map={transformer:cpu,lm_head:0}"], "part of the model on the CPU"),
        (["model.device_map=balanced"], "give auto or a mapping"),
        (["model.device_map=auto", "device=cpu"], "both place the model"),
        (["model.device_map=auto", "device=auto", "model.compat=true"], "model.compat=true"),
    ],
)
def test_device_maps_that_cannot_work_are_refused_before_the_model_loads(overrides, message):
    with pytest.raises(MlpimError, match=message) as err:
        preflight(compose(["model=tiny", "experiment=ioi_mlp8_das", *overrides]))
    assert "\n" not in str(err.value)


def test_device_map_auto_that_would_offload_is_refused(monkeypatch):
    """`auto` where accelerate would put part of the model on the CPU next to GPUs, or on disk."""
    import accelerate

    cfg = compose(["model=tiny", "device=cpu"])
    model = model_for(cfg).original_model
    for offload in (
        {"transformer": 0, "lm_head": "cpu"},
        {"transformer": "cpu", "lm_head": "disk"},
    ):
        monkeypatch.setattr(accelerate, "infer_auto_device_map", lambda *a, o=offload, **k: o)
        with pytest.raises(ConfigError, match="does not fit in the GPUs' free memory"):
            place(model, "auto")


def test_a_float32_direction_is_checked_on_the_model_in_bfloat16(tmp_path):
    """model.dtype=auto loads a model in bfloat16 on a GPU: a direction found in float32 on the
    CPU is accepted there (its weights rounded to bfloat16 are the same), and the other way
    round; in float16 (rounded twice) it is refused as other weights."""
    run(compose(["experiment=ioi_mlp8_das", *FAST]), tmp_path / "f32")
    run(compose(["experiment=ioi_mlp8_das", *FAST, "model.dtype=bfloat16"]), tmp_path / "bf16")
    for found, on in (("f32", "bfloat16"), ("bf16", "float32")):
        direction = load_direction(tmp_path / found / C.DIRECTION)
        model = model_for(compose([*TINY, f"model.dtype={on}"]))
        assert direction.fitted(model, "mlp_post", 1).shape == (128, 1)
    direction = load_direction(tmp_path / "f32" / C.DIRECTION)
    with pytest.raises(ConfigError, match="was found on model 'tiny'"):
        direction.fitted(model_for(compose([*TINY, "model.dtype=float16"])), "mlp_post", 1)
