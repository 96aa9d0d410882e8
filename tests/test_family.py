"""`mlpim.engine.family`: each tiny family's traits as the model's own Hugging Face config and
modules state them, and the kernel's one-line refusal of a family it was not written for."""

from __future__ import annotations

import pytest

from mlpim.config import compose
from mlpim.engine.family import (
    KERNEL_TYPES,
    family_of,
    is_rms,
    post_attn_norm,
    post_mlp_norm,
)
from mlpim.engine.interventions import choose_engine
from mlpim.errors import ConfigError

ACTIVATION = ("activation_function", "hidden_activation", "hidden_act")  # HF's names for it


@pytest.fixture(scope="module")
def tiny_neox():
    """Random 3-layer GPT-NeoX (parallel residual, partial rotary): the cache engine's only."""
    from mlpim.experiments.common import model_for

    return model_for(compose(["model=tiny", "model.arch=neox", "device=cpu"]))


@pytest.fixture(params=("tiny_gpt2", "tiny_llama", "tiny_gemma3", "tiny_neox"))
def model(request):
    return request.getfixturevalue(request.param)


def _hf_modules(model) -> list[tuple[str, object]]:
    """The wrapped HF model's modules, named as in HF (the bridge's wrappers left out)."""
    wrap = "._original_component"
    return [(n.replace(wrap, ""), m) for n, m in model.original_model.named_modules()]


def _has(model, suffix: str) -> bool:
    return any(name.endswith(suffix) for name, _ in _hf_modules(model))


def test_traits_are_the_models_own(model):
    fam, conf = family_of(model), model.original_model.config
    assert fam is family_of(model)  # read once
    assert fam.model_type == conf.model_type
    assert fam.rms_norm == hasattr(conf, "rms_norm_eps") == is_rms(model.blocks[0].ln1)
    assert fam.act_fn == next(getattr(conf, a) for a in ACTIVATION if hasattr(conf, a))
    assert fam.gated_mlp == _has(model, "mlp.gate_proj")
    rotary = any("Rotary" in type(m).__name__ for _, m in _hf_modules(model))
    assert fam.rotary == rotary == (conf.model_type != "gpt2")
    assert fam.qk_norm == _has(model, "self_attn.q_norm")
    assert fam.post_mlp == _has(model, "post_feedforward_layernorm")
    assert fam.post_attn == _has(model, "pre_feedforward_layernorm")  # sandwich norms
    for i in range(model.cfg.n_layers):
        assert (post_attn_norm(model, i) is not None) == fam.post_attn
        assert (post_mlp_norm(model, i) is not None) == fam.post_mlp
    assert fam.query_scalar == getattr(conf, "query_pre_attn_scalar", None)
    types = getattr(conf, "layer_types", None) or [None] * model.cfg.n_layers
    sliding = [conf.sliding_window if t == "sliding_attention" else None for t in types]
    assert list(fam.windows) == sliding and len(sliding) == model.cfg.n_layers


def test_gemma3_has_every_trait(tiny_gemma3):
    fam = family_of(tiny_gemma3)
    assert fam.rms_norm and fam.gated_mlp and fam.rotary and fam.qk_norm
    assert fam.post_attn and fam.post_mlp and fam.query_scalar is not None
    assert fam.windows[0] == fam.windows[2] is not None and fam.windows[1] is None
    assert fam.kernel_refusal is None


def test_gpt2_and_llama_have_none_of_gemmas(tiny_gpt2, tiny_llama):
    gpt2, llama = family_of(tiny_gpt2), family_of(tiny_llama)
    assert not gpt2.rms_norm and not gpt2.gated_mlp and not gpt2.rotary
    assert llama.rms_norm and llama.gated_mlp and llama.rotary
    for fam in (gpt2, llama):
        assert not (fam.qk_norm or fam.post_attn or fam.post_mlp)
        assert fam.query_scalar is None and set(fam.windows) == {None}
        assert fam.kernel_refusal is None and fam.model_type in KERNEL_TYPES


def test_the_kernel_refuses_a_family_it_does_not_know_in_one_line(tiny_neox):
    why = family_of(tiny_neox).kernel_refusal
    assert why == f"model_type 'gpt_neox' is not one of {KERNEL_TYPES}"
    with pytest.raises(ConfigError) as err:
        choose_engine(tiny_neox, "kernel", [], "mlp_post")
    assert str(err.value) == f"method.engine=kernel cannot run here: {why}; use auto or cache"
    assert choose_engine(tiny_neox, "auto", [], "mlp_post") == "cache"
