"""Typed config schemas registered in Hydra's ConfigStore, so a typo fails at compose time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class Landmarks:
    handover_layer: int | None = None  # resid layer after S-inhibition heads, before name movers
    mlp_in_the_middle: int | None = None  # the MLP between them
    name_movers: list[Any] = field(default_factory=list)  # [[layer, head], ...]


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING  # gguf | hf | tiny
    arch: str = ""  # tiny: the family to build (gpt2, llama, gemma3, qwen2, gpt_neox, olmo2 ...)
    hf_name: str = ""  # hub id, used to find the local HF cache (never downloaded)
    path: str | None = None  # a local directory with config + weights + tokenizer
    file: str | None = None  # a local GGUF file (model=gguf)
    gguf_package: str | None = None
    gguf_file: str | None = None
    bos_token: str | None = None  # token prepended to prompts; default: the tokenizer's BOS
    compat: bool = False  # TransformerLens processing: fold LN, center writing weights/unembed
    refactor_factored_attn_matrices: bool = False
    dtype: str = "float32"
    tiny: dict[str, Any] = field(default_factory=dict)  # sizes of the random tiny model
    landmarks: Landmarks = field(default_factory=Landmarks)


@dataclass
class SiteConfig:
    kind: str = MISSING  # resid_pre | resid_mid | resid_post | attn_out | mlp_out | mlp_post
    layer: int | None = MISSING  # None: the model config has no landmark for it


@dataclass
class MethodConfig:
    name: str = MISSING  # das | mean_diff | none
    dim: int = 1
    lr: float = 0.01
    lr_end_factor: float = 0.1
    epochs: int = 30
    engine: str = "auto"  # auto | kernel | cache | full  (see mlpim/engine/prepare.py)
    parametrization: str = "orthogonal"


@dataclass
class Config:
    experiment: str = MISSING
    runner: str = MISSING
    seed: int = 0
    device: str = "auto"
    direction: str | None = None  # a saved subspace (.pt), or a plain tensor file (.pt/.npy)
    direction_site: str | None = None  # site kind of a plain tensor direction
    direction_layer: int | None = None  # layer of a plain tensor direction
    model: ModelConfig = field(default_factory=ModelConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    dataset: Any = MISSING
    extra: dict[str, Any] = field(default_factory=dict)  # runner-specific knobs


def register_configs() -> None:
    """Register the schemas; `mlpim/conf/config.yaml` extends `config_schema`."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the config as `mlpim run` would, for notebooks and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])
