"""Tiny random Hugging Face causal LMs of several families, built locally (never downloaded).

`build_tiny(arch, tokenizer)` returns a random `PreTrainedModel` whose `config.architectures`
names its model class, so `TransformerBridge.boot_transformers(BOOT_NAME[arch], hf_model=...)`
picks the right adapter offline. The weights are scaled up from the usual 0.02 init so the
logits vary (std well above 0.1) and equality tests between the bridge and HF mean something;
`model=tiny` (`mlpim.engine.models.load_model`) builds GPT-2 and Llama here with Hugging Face's
default init instead (`HF_INIT`), the weights the tests' pinned numbers were measured on.
`word_tokenizer` is the tiny models' word-level tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mlpim.errors import ConfigError

MAX_POSITIONS = 128
SLIDING_WINDOW = 4  # short, so that test prompts reach past it on Gemma 3's sliding layers
INIT_RANGE = 0.2  # std of the random weights for families whose default is 0.02
GPT2_INIT_RANGE = 0.1  # GPT-2 ties its unembedding to the embedding; 0.1 gives logits std ~0.9
HF_INIT = {"gpt2": 0.02, "llama": 0.02}  # model=tiny: Hugging Face's default init for these two
SIZES = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "seed")  # build_tiny's sizes
EOT = "<|endoftext|>"
PUNCTUATION = tuple(".,!?;:'\"()-")

Sizes = dict[str, Any]  # what a builder reads: sizes, vocab, special ids and the init std


def _llama_like(s: Sizes) -> dict[str, Any]:
    """Config kwargs shared by the Llama-style families (rotary, GQA, gated MLP, RMSNorm)."""
    return {
        "num_hidden_layers": s["n_layers"],
        "hidden_size": s["d_model"],
        "num_attention_heads": s["n_heads"],
        "num_key_value_heads": s["n_kv_heads"],
        "intermediate_size": s["d_mlp"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": s["init"] or INIT_RANGE,
        "tie_word_embeddings": False,
        **_ids(s),
    }


def _ids(s: Sizes) -> dict[str, int]:
    return {"bos_token_id": s["bos"], "eos_token_id": s["eos"], "pad_token_id": s["pad"]}


def _gpt2(s: Sizes):
    conf = GPT2Config(
        n_layer=s["n_layers"],
        n_embd=s["d_model"],
        n_head=s["n_heads"],
        n_inner=s["d_mlp"],
        vocab_size=s["vocab"],
        n_positions=MAX_POSITIONS,
        initializer_range=s["init"] or GPT2_INIT_RANGE,
        **_ids(s),
    )
    return conf, GPT2LMHeadModel


def _llama(s: Sizes):
    return LlamaConfig(**_llama_like(s)), LlamaForCausalLM


def _mistral(s: Sizes):
    """Without a sliding window (4 would cripple it), hence the same weights as `llama`."""
    return MistralConfig(**_llama_like(s), sliding_window=None), MistralForCausalLM


def _qwen2(s: Sizes):
    return Qwen2Config(**_llama_like(s), use_sliding_window=False), Qwen2ForCausalLM


def _olmo2(s: Sizes):
    return Olmo2Config(**_llama_like(s)), Olmo2ForCausalLM


def _phi3(s: Sizes):
    return Phi3Config(**_llama_like(s), sliding_window=None), Phi3ForCausalLM


def _gemma3(s: Sizes):
    """Sliding-window and global layers alternate; QK norm and sandwich norms are built in."""
    kinds = ("sliding_attention", "full_attention")
    conf = Gemma3TextConfig(
        **_llama_like(s),
        head_dim=s["d_model"] // s["n_heads"],
        query_pre_attn_scalar=s["d_model"] // s["n_heads"],
        sliding_window=SLIDING_WINDOW,
        layer_types=[kinds[i % 2] for i in range(s["n_layers"])],
    )
    return conf, Gemma3ForCausalLM


def _neox(s: Sizes):
    """Pythia-style: parallel attention + MLP residual, rotary on a quarter of each head."""
    conf = GPTNeoXConfig(
        num_hidden_layers=s["n_layers"],
        hidden_size=s["d_model"],
        num_attention_heads=s["n_heads"],
        intermediate_size=s["d_mlp"],
        vocab_size=s["vocab"],
        max_position_embeddings=MAX_POSITIONS,
        rotary_pct=0.25,
        use_parallel_residual=True,
        initializer_range=s["init"] or INIT_RANGE,
        tie_word_embeddings=False,
        **_ids(s),
    )
    return conf, GPTNeoXForCausalLM


_BUILDERS: dict[str, Callable[[Sizes], tuple[Any, type]]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "gemma3": _gemma3,
    "qwen2": _qwen2,
    "neox": _neox,
    "olmo2": _olmo2,
    "phi3": _phi3,
    "mistral": _mistral,
}
FAMILIES: tuple[str, ...] = tuple(_BUILDERS)

# First argument of `TransformerBridge.boot_transformers` for each family, checked offline with
# `hf_model=`: the config (and so the adapter, from `config.architectures`) comes from the model
# and the name only becomes `cfg.model_name`. It must not be a TransformerLens model alias:
# "neox" and "pythia" are, and would relabel the bridge as EleutherAI/gpt-neox-20b / pythia-70m
# with a deprecation warning, so GPT-NeoX boots under its HF model_type "gpt_neox".
BOOT_NAME: dict[str, str] = {arch: arch for arch in FAMILIES} | {"neox": "gpt_neox"}

# Hook sites of mlpim that a family's bridge lacks, with the reason.
MISSING_SITES: dict[str, dict[str, str]] = {}


def build_tiny(
    arch: str,
    tokenizer,
    n_layers: int = 3,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    seed: int = 0,
    init_range: float | None = None,
) -> PreTrainedModel:
    """A random `arch` causal LM over `tokenizer`'s vocabulary, in eval mode.

    Seeded without touching the global torch RNG; head_dim is d_model // n_heads; GPT-2 and
    GPT-NeoX ignore n_kv_heads (no grouped-query attention). `init_range`: the std of the
    random weights (default: the family's scaled-up one, `INIT_RANGE` / `GPT2_INIT_RANGE`).
    """
    if arch not in _BUILDERS:
        raise ConfigError(f"unknown tiny architecture {arch!r}; allowed: {', '.join(FAMILIES)}")
    sizes = {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "d_mlp": d_mlp,
        "vocab": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "init": init_range,
    }
    conf, model_class = _BUILDERS[arch](sizes)
    conf.architectures = [model_class.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(conf).eval()


def save_tiny(arch: str, tokenizer, path: str | Path, **sizes) -> Path:
    """Save a `build_tiny` model and its tokenizer to `path` like a downloaded model.

    Load the tokenizer back with `PreTrainedTokenizerFast.from_pretrained`: for qwen2,
    transformers 5's `AutoTokenizer` forces a BPE `Qwen2Tokenizer` (model_type qwen2 is in
    its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) that cannot read the word-level vocabulary.
    """
    path = Path(path)
    build_tiny(arch, tokenizer, **sizes).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def word_tokenizer(words: Iterable[str], cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over `words` (each with and without a leading space) and punctuation.

    "<|endoftext|>" is id 0 and serves as bos/eos/pad/unk. Built in memory (no temporary files)
    with `add_bos_token=True`, the form TransformerLens's bridge would otherwise reload it in from
    `name_or_path`, so the bridge takes it as it is; saved to `cache_dir` when one is given.
    """
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab = {EOT: 0}
    for word in [*words, *PUNCTUATION]:
        if not word.strip():
            continue
        for text in (word, " " + word):
            for piece, _ in pre.pre_tokenize_str(text):
                vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOT])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        add_bos_token=True,
        name_or_path=str(cache_dir) if cache_dir else "mlpim-word-level",
    )
    if cache_dir is not None:
        tok.save_pretrained(str(Path(cache_dir)))
    return tok
