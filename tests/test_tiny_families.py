"""Tiny random models of every family in `mlpim.engine.tiny` under TransformerBridge.

Per family: the bridge boots offline from the HF model, mlpim's hook sites exist with the
expected shapes, the bridge's logits equal HF's, and resuming from the HF KV cache (plain,
left-padded with an attention mask, and with a hook patching the first resumed column) equals
the full forward.
"""

from __future__ import annotations

import pytest
import torch

from mlpim.engine import cache as engine_cache
from mlpim.engine.tiny import (
    BOOT_NAME,
    FAMILIES,
    MISSING_SITES,
    build_tiny,
    save_tiny,
    word_tokenizer,
)
from mlpim.errors import ConfigError

WORDS = "When John and Mary went to the store , John gave a drink to Mary Alice Bob".split()
D_MLP, N_HEADS, D_HEAD = 128, 4, 16
SITES = {  # hook name at layer 1 -> expected shape after (batch, pos)
    "blocks.1.hook_resid_pre": (64,),
    "blocks.1.hook_resid_post": (64,),
    "blocks.1.hook_attn_out": (64,),
    "blocks.1.hook_mlp_out": (64,),
    "blocks.1.mlp.hook_post": (D_MLP,),
    "blocks.1.attn.hook_z": (N_HEADS, D_HEAD),
}
T, P = 10, 6  # prompt length, length of the cached prefix
LENS = (10, 7, 4)  # left-padded prompt lengths; the last one's prefix is all padding
ATOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tok):
    """(arch, HF model, bridge) for one family; built once per module.

    Booting wraps the HF model's modules in place, so the HF model returned is a second,
    untouched build with the same seed (`test_seeded_and_sane` checks that builds are equal).
    """
    from transformer_lens.model_bridge import TransformerBridge

    arch = request.param
    bridge = TransformerBridge.boot_transformers(
        BOOT_NAME[arch], hf_model=build_tiny(arch, tok).eval(), tokenizer=tok, device="cpu"
    )
    bridge.eval()
    return arch, build_tiny(arch, tok), bridge


def _tokens(tok, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, len(tok), (rows, T), generator=g)


def _left_padded(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i keeps its last LENS[i] tokens; the rest become pad id 0 with mask 0."""
    mask = torch.ones_like(tokens)
    for i, n in enumerate(LENS):
        mask[i, : T - n] = 0
    return tokens * mask, mask


def _patch(col: int):
    def fn(act, hook):
        act = act.clone()
        act[:, col] = -2.0 * act[:, col] + 1.0
        return act

    return fn


def test_unknown_arch_names_the_families(tok):
    with pytest.raises(ConfigError, match="allowed: gpt2, llama"):
        build_tiny("bert", tok)


def test_boot_names_are_not_aliases():
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    assert set(BOOT_NAME) == set(FAMILIES)
    assert [n for n in BOOT_NAME.values() if resolve_model_alias(n) is not None] == []


def test_seeded_and_sane(family, tok):
    """Same seed, same weights; logits vary (std > 0.1), finite, softmax far from one-hot."""
    arch, model, _ = family
    again = build_tiny(arch, tok).state_dict()
    assert all(torch.equal(w, again[k]) for k, w in model.state_dict().items())
    assert model.config.architectures == [type(model).__name__]
    with torch.no_grad():
        logits = model(_tokens(tok, 2)).logits
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1
    assert logits.softmax(-1).amax(-1).mean() < 0.9


def test_family_features(tok):
    """The features each family is here for are switched on."""
    gemma = build_tiny("gemma3", tok).config
    assert set(gemma.layer_types) == {"sliding_attention", "full_attention"}
    assert gemma.sliding_window < T  # the test prompts reach past the window
    neox = build_tiny("neox", tok).config
    assert neox.use_parallel_residual and neox.rope_parameters["partial_rotary_factor"] < 1
    qwen = build_tiny("qwen2", tok)
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    assert build_tiny("llama", tok).config.num_key_value_heads < N_HEADS  # grouped-query


def test_sites_exist_with_shapes(family, tok):
    arch, _, bridge = family
    wanted = [s for s in SITES if s not in MISSING_SITES.get(arch, {})]
    assert all(s in bridge.hook_dict for s in wanted)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(_tokens(tok, 2), names_filter=wanted)
    assert {s: tuple(cache[s].shape) for s in wanted} == {s: (2, T, *SITES[s]) for s in wanted}


def test_bridge_logits_equal_hf(family, tok):
    _, model, bridge = family
    tokens = _tokens(tok, 2)
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), model(tokens).logits, atol=ATOL, rtol=0)


def test_kv_cache_resume(family, tok):
    _, _, bridge = family
    tokens = _tokens(tok, 2)
    with torch.no_grad():
        full = bridge(tokens)
        head, past = engine_cache.prefix(bridge, tokens[:, :P], torch.ones_like(tokens[:, :P]))
        tail = engine_cache.run_from(bridge, tokens[:, P:], torch.ones_like(tokens), past)
    torch.testing.assert_close(head, full[:, :P], atol=ATOL, rtol=0)
    torch.testing.assert_close(tail, full[:, P:], atol=ATOL, rtol=0)


def test_kv_cache_left_padded(family, tok):
    """Padded batch, cached prefix + resumed suffix: each row equals its prompt run alone."""
    _, _, bridge = family
    tokens = _tokens(tok, len(LENS))
    padded, mask = _left_padded(tokens)
    with torch.no_grad():
        head, past = engine_cache.prefix(bridge, padded[:, :P], mask[:, :P])
        tail = engine_cache.run_from(bridge, padded[:, P:], mask, past)
        joined = torch.cat([head, tail], dim=1)
        for i, n in enumerate(LENS):
            alone = bridge(tokens[i : i + 1, T - n :])[0]
            torch.testing.assert_close(joined[i, T - n :], alone, atol=ATOL, rtol=0)


def test_kv_cache_reused_unchanged(family, tok):
    """Resuming twice from one prefix cache gives the same logits, and the cache keeps its length."""
    _, _, bridge = family
    padded, mask = _left_padded(_tokens(tok, len(LENS)))
    with torch.no_grad():
        _, past = engine_cache.prefix(bridge, padded[:, :P], mask[:, :P])
        first = engine_cache.run_from(bridge, padded[:, P:], mask, past)
        second = engine_cache.run_from(bridge, padded[:, P:], mask, past)
    assert past.get_seq_length() == P
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@pytest.mark.parametrize("site", SITES)
def test_kv_cache_hooked_resume(family, tok, site):
    """A hook patching the first resumed column equals the same patch in the full forward."""
    arch, _, bridge = family
    if site in MISSING_SITES.get(arch, {}):
        pytest.skip(MISSING_SITES[arch][site])
    padded, mask = _left_padded(_tokens(tok, len(LENS)))
    with torch.no_grad():
        plain = bridge(padded, attention_mask=mask)
        full = bridge.run_with_hooks(padded, attention_mask=mask, fwd_hooks=[(site, _patch(P))])
        _, past = engine_cache.prefix(bridge, padded[:, :P], mask[:, :P])
        tail = engine_cache.run_from(bridge, padded[:, P:], mask, past, [(site, _patch(0))])
    assert (full[:, P:] - plain[:, P:]).abs().max() > 0.1  # the patch matters
    torch.testing.assert_close(tail, full[:, P:], atol=ATOL, rtol=0)


def test_save_tiny_reloads(family, tok, tmp_path):
    """The saved directory loads back like a downloaded model: same class, logits, tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    arch, model, _ = family
    path = save_tiny(arch, tok, tmp_path / arch)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is type(model)
    tokens = _tokens(tok, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, atol=0, rtol=0)
    text = " John gave Mary a drink ."
    assert PreTrainedTokenizerFast.from_pretrained(path).encode(text) == tok.encode(text)
    if arch == "qwen2":
        pytest.xfail(
            "transformers 5 AutoTokenizer ignores tokenizer_config's TokenizersBackend for "
            "model_type qwen2 (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) and builds a BPE "
            "Qwen2Tokenizer, which cannot read the word-level vocabulary"
        )
    assert AutoTokenizer.from_pretrained(path).encode(text) == tok.encode(text)
