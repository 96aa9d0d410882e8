"""What a model family has, read off the loaded model itself (never guessed from its name).

`family_of(model)` gives a `Family`: the traits mlpim's own code depends on (norm type, MLP
activation and gating, rotary, QK norms, post-attention and post-feedforward norms, the query
scale, each block's sliding window) and why the END-only kernel (`engine.fastpath`) cannot run
it, if it cannot. Every trait is read from the TransformerLens config, the blocks' modules or
the wrapped Hugging Face config (`model.original_model.config`). Rotary is one trait: the kernel
reads each block's own cos/sin from the model's hooks, one base or Gemma 3's local and global.

The per-block modules (`post_attn_norm`, `post_mlp_norm`) and a norm module's own kind
(`norm_gain`, `is_rms`) are asked of the module each time, as the model has them now.

Adding a family: the kernel runs only the Hugging Face `model_type`s in `KERNEL_TYPES`; a new
trait the kernel or an analysis must know is a field here, read from the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

KERNEL_TYPES = ("gpt2", "llama", "gemma3_text")  # Hugging Face model_type it was written for
SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")


@dataclass(frozen=True)
class Family:
    """A model family's traits, as `family_of` reads them off one loaded model."""

    model_type: str | None  # Hugging Face model_type (None: no Hugging Face config)
    rms_norm: bool  # RMSNorm (no centring), else LayerNorm
    act_fn: str | None  # the MLP's activation, as TransformerLens names it
    gated_mlp: bool  # act(gate) * up (Llama-style), else act(W_in x)
    rotary: bool  # rotary positions (the kernel reads each block's own cos/sin)
    qk_norm: bool  # per-head norms of queries and keys before rotary (Gemma 3)
    post_attn: bool  # a norm between the attention output and the residual (ln1_post)
    post_mlp: bool  # a norm between the MLP output and the residual (ln2_post)
    query_scalar: float | None  # q·k is divided by sqrt of this (Gemma), else by sqrt(d_head)
    windows: tuple[int | None, ...]  # per block: its sliding window (None: global attention)
    kernel_refusal: str | None  # why the END-only kernel cannot run it (None: it may)


def _hf_config(model):
    """The wrapped Hugging Face model's config (None for a model that wraps none)."""
    return getattr(getattr(model, "original_model", None), "config", None)


def _kernel_refusal(conf) -> str | None:
    """Why the END-only kernel cannot run a model of this Hugging Face config (None: it may,
    subject to the runtime guard)."""
    kind = getattr(conf, "model_type", None)
    if kind not in KERNEL_TYPES:
        return f"model_type {kind!r} is not one of {KERNEL_TYPES}"
    scaling = getattr(conf, "rope_scaling", None) or {}
    if scaling.get("rope_type", "default") != "default":
        return f"rotary scaling {scaling.get('rope_type')!r}"
    if getattr(conf, "scale_attn_by_inverse_layer_idx", False):
        return "attention scaled by the inverse layer index"
    for cap in SOFTCAPS:
        if getattr(conf, cap, None):
            return f"{cap} {getattr(conf, cap)}"
    return None


def _windows(conf, n_layers: int) -> tuple[int | None, ...]:
    """Each block's sliding window, from the config's `layer_types` and `sliding_window`."""
    types = getattr(conf, "layer_types", None) or [None] * n_layers
    width = getattr(conf, "sliding_window", None)
    return tuple(width if t == "sliding_attention" else None for t in types)


def _read(model) -> Family:
    cfg, conf = model.cfg, _hf_config(model)
    parts = {name for name, _ in model.blocks[0].named_children()}
    return Family(
        model_type=getattr(conf, "model_type", None),
        rms_norm=str(cfg.normalization_type or "").startswith("RMS"),
        act_fn=cfg.act_fn,
        gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
        rotary=cfg.positional_embedding_type == "rotary",
        qk_norm=getattr(model.blocks[0].attn, "q_norm", None) is not None,
        post_attn="ln1_post" in parts,
        post_mlp="ln2_post" in parts,
        query_scalar=getattr(conf, "query_pre_attn_scalar", None),
        windows=_windows(conf, cfg.n_layers),
        kernel_refusal=_kernel_refusal(conf),
    )


def family_of(model) -> Family:
    """The family of a TransformerLens model or bridge, read once and kept on the model."""
    if "_mlpim_family" not in model.__dict__:
        model.__dict__["_mlpim_family"] = _read(model)
    return model.__dict__["_mlpim_family"]


def post_attn_norm(model, i: int):
    """Block i's norm between its attention and the residual (Gemma 3's ln1_post), or None."""
    return getattr(model.blocks[i], "ln1_post", None)


def post_mlp_norm(model, i: int):
    """Block i's norm between its MLP and the residual (Gemma 2/3's ln2_post), or None."""
    return getattr(model.blocks[i], "ln2_post", None)


def norm_gain(ln) -> Float[Tensor, " d"]:
    """A bridge norm module's gain: 1 + weight where it stores the offset (Gemma), else weight."""
    return (1.0 + ln.weight) if ln.uses_weight_offset else ln.weight


def is_rms(ln) -> bool:
    """Whether a bridge norm module is an RMSNorm (it does not centre its input)."""
    return bool(ln.uses_rms_norm)
