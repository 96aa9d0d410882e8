"""Memory known before the run (issue 33): the estimate (`mlpim.engine.memory`) from a model's
declared sizes or its file's header, and preflight's one-line refusal of a run that cannot fit,
before the model loads, with a budget forced by `MLPIM_MEMORY_BUDGET`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import PROBE, assert_one_line_error, cli
from safetensors.torch import save_file

from mlpim.config import compose
from mlpim.engine import memory
from mlpim.errors import MlpimError
from mlpim.experiments.common import model_for
from mlpim.preflight import check_memory, model_shape, workload


@pytest.mark.parametrize("experiment", ["ioi_mlp8_das", "illusion_check"])
def test_a_run_that_cannot_fit_is_refused_in_one_line(experiment, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLPIM_MEMORY_BUDGET", "1MiB")
    v = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    np.save(tmp_path / "v.npy", v / np.linalg.norm(v))
    check = [f"direction={tmp_path}/v.npy", "direction_site=mlp_post", "direction_layer=1"]
    args = [f"experiment={experiment}", *PROBE, f"hydra.run.dir={tmp_path}/r"]
    args += check if experiment == "illusion_check" else []
    line = assert_one_line_error(*cli(capsys, "run", *args), "needs about", "1 MiB free")
    assert "MLPIM_MEMORY_BUDGET=1MiB" in line and "weights" in line
    assert not (tmp_path / "r").exists()


def test_a_budget_that_is_not_a_size_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLPIM_MEMORY_BUDGET", "lots")
    args = ["experiment=ioi_mlp8_das", *PROBE, f"hydra.run.dir={tmp_path}/r"]
    assert_one_line_error(*cli(capsys, "run", *args), "MLPIM_MEMORY_BUDGET=lots: not a size")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_tiny_estimate_is_near_its_real_weights(arch):
    cfg = compose(["experiment=ioi_mlp8_das", "model=tiny", f"model.arch={arch}", "device=cpu"])
    shape = model_shape(cfg, None)
    model = model_for(cfg)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    guess = memory.estimate(shape, 4, workload(cfg))
    assert 0.5 < guess["weights"] / real < 2, (guess, real)
    assert (shape.n_layers, shape.d_model) == (model.cfg.n_layers, model.cfg.d_model)


def test_the_budget_is_compared_with_the_estimate(monkeypatch):
    cfg = compose(["experiment=ioi_mlp8_das", "model=tiny", "device=cpu"])
    need = sum(memory.estimate(model_shape(cfg, None), 4, workload(cfg)).values())
    monkeypatch.setenv("MLPIM_MEMORY_BUDGET", str(need))
    check_memory(cfg, None)  # fits exactly
    monkeypatch.setenv("MLPIM_MEMORY_BUDGET", str(need - 1))
    with pytest.raises(MlpimError, match="needs about"):
        check_memory(cfg, None)


def test_unknown_sizes_say_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPIM_MEMORY_BUDGET", "1MiB")
    cfg = compose(["experiment=ioi_mlp8_das", "model=hf", f"model.path={tmp_path}"])
    assert model_shape(cfg, None) is None  # no config.json, no weights
    check_memory(cfg, None)


def test_workload_counts_the_pairs_and_natural_prompts(tmp_path):
    cfg = compose(["experiment=illusion_check", "dataset.n_train_pairs=10"])
    work = workload(cfg)
    assert (work.n_pairs, work.n_natural) == (10 + 3 * 100, 1000)
    (tmp_path / "p.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    cfg = compose(["experiment=ioi_mlp8_das", "dataset=pairs", f"dataset.path={tmp_path}/p.jsonl"])
    assert workload(cfg).n_pairs == 2
    cfg = compose(["experiment=ioi_mlp8_das", "dataset=mib", f"dataset.path={tmp_path}/p.jsonl"])
    assert workload(cfg).n_pairs == 2


def test_gguf_header_gives_the_shape(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])  # an array of strings
    writer.add_array("some.numbers", [1.0, 2.0])
    sizes = {"token_embd.weight": (3, 8)}  # numpy's order: vocab x d_model
    for i in range(2):
        sizes |= {f"blk.{i}.attn_k.weight": (4, 8), f"blk.{i}.ffn_down.weight": (8, 16)}
    for name, shape in sizes.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shape = memory.gguf_shape(path)
    assert shape == memory.ModelShape(24 + 2 * (32 + 128), 2, 8, 16, 3, 4)
    assert memory.gguf_shape(tmp_path / "missing.gguf") is None


def test_hf_folder_gives_the_shape(tmp_path):
    config = {"num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16}
    config |= {"vocab_size": 5, "num_attention_heads": 2, "num_key_value_heads": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, tmp_path / "model.safetensors")
    assert memory.hf_shape(tmp_path) == memory.ModelShape(17, 2, 8, 16, 5, 4)


def test_declared_shape_counts_a_llama_like_model():
    shape = memory.declared_shape(30, 576, 1536, 49152, kv_width=192)  # SmolLM2-135M's sizes
    embeddings = 49152 * 576  # tied in SmolLM2: counted once in its file
    assert shape.n_params - embeddings == 134_479_872  # its GGUF file: 134,515,008 with the norms


@pytest.mark.parametrize(
    "text, n",
    [
        ("1MiB", 1 << 20),
        ("8GiB", 8 << 30),
        ("2GB", 2_000_000_000),
        ("1e9", 10**9),
        ("512 mb", 512e6),
    ],
)
def test_sizes_are_parsed(text, n):
    assert memory.parse_size(text, "X") == n


@pytest.mark.parametrize("text", ["lots", "1XB", "", "-1GiB", "1.2.3GiB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(MlpimError, match="not a size"):
        memory.parse_size(text, "X")


def test_free_memory_is_known_on_cpu():
    free = memory.free_bytes("cpu")
    assert free is None or free > 0
    assert memory.free_bytes("meta") is None
    assert memory.size_text(1.5 * memory.GIB) == "1.5 GiB"
    assert memory.size_text(3 * memory.MIB) == "3 MiB"
