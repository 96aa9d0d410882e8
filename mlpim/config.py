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
    dtype: str = "float32"  # float32 | bfloat16 | float16 | float64 (directions stay >= float32)
    tiny: dict[str, Any] = field(default_factory=dict)  # sizes of the random tiny model
    sizes: dict[str, int] = field(default_factory=dict)  # d_model, d_mlp, n_layers of a fixed
    # model, so that preflight refuses a bad site.layer or method.dim before loading it
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
class DatasetConfig:
    """The task: IOI's prompt distribution (`conf/dataset/ioi.yaml` documents each key), or
    pairs from a file (`dataset=pairs`, `dataset=facts`: `conf/dataset/*.yaml`)."""

    name: str = MISSING
    path: str | None = None  # pairs: the JSONL file; facts: the bundled set, or a ROME file
    test_fraction: float = 0.5  # pairs/facts: share of groups (subjects) held out for test
    pairs_per_fact: int = 1  # facts: source facts drawn per base fact
    relations: list[str] = field(default_factory=list)  # facts: keep only these (all if empty)
    min_pairs: int = 20  # pairs/facts: fewer pairs in a split is an error
    seed: int = 0
    batch_size: int = 20
    share_names: bool = True
    n_train_pairs: int = 200
    n_test_pairs: int = 100
    n_eval_prompts: int = 200
    min_prompts: int = 20
    train_templates: list[int] = field(default_factory=list)
    test_templates: list[int] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)


@dataclass
class ExtraConfig:
    """Every experiment's own options (`extra.*`), declared once with their defaults.

    Each `conf/experiment/*.yaml` sets and documents the ones its runner reads."""

    # directions and alignment (illusion_check, ioi_alignment, ioi_dormant, ioi_path_patching)
    resid_direction: str | None = None
    n_random: int = 1000
    n_grad_prompts: int = 100
    n_head_pairs: int = 20
    resid_layer: int | None = "${model.landmarks.handover_layer}"  # type: ignore[assignment]
    n_per_combo: int = 50
    split: str = "test"
    frozen_norm: bool = False
    # ioi_locate, ioi_nullspace, ioi_random_mlp, ioi_neuron_budget
    n_pairs_per_direction: int = 20
    hist_split: str = "test"
    n_hist_prompts: int = 200
    n_random_seeds: int = 3
    n_grid: list[Any] = field(default_factory=lambda: [8, 32, 128, 512, "all"])
    subset: str = "first"
    # mlp_recovery
    corpus_path: str | None = None
    chunk_len: int = 64
    positions_per_chunk: int = 16
    n_activations: int = 2000
    n_train: int = 1600
    layers: list[int] | None = None
    layer_step: int = 3
    n_directions: int = 5
    n_logistic_directions: int = 1
    z_values: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    logistic_c: float = 1e4
    norm_scale: str = "mean"
    fast: bool = True
    batch_size: int = 16
    # fact_patching / fact_editing (also read `layers`, `layer_step`, `corpus_path`, `chunk_len`,
    # `batch_size` above)
    known_only: bool = True  # keep only facts the model gets right (false: random test models)
    pair_steps: int = 30  # Adam steps of the per-pair directions (all pairs in one batched run)
    n_cov_tokens: int = 4096  # offline-text tokens for the second moment C of mlp_post
    cov_ridge: float = 1e-3  # ridge (× mean eigenvalue of C) added only when C is singular
    n_neighbours: int = 10  # other facts of the same relation per edit (specificity)
    pair_run: str | None = None  # fact_editing: a fact_patching run dir to reuse its directions
    # toy_illusion
    n_seeds: int = 50
    das_steps: int = 300
    das_lr: float = 0.05
    iia_tol: float = 0.05
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    extra_dims: int = 0
    # ---- illusion_check, illusion_benchmark (issue 20): references, planted cases, cache ----
    random_mlp_seeds: int = 5  # random MLPs, one 1-D DAS run each (the random_mlp site note)
    random_mlp_epochs: int | None = None  # null: method.epochs (as long as the direction)
    n_random_directions: int = 32  # random unit directions: the gate's reference
    n_natural: int = 8  # top natural directions: placement of the direction checks
    n_natural_prompts: int = 2000  # IOI prompts (all four patterns) whose END activations are
    # the site's natural distribution (off_distribution, the planted dormant part)
    natural_ridge: float = 1.0  # ridge (× mean eigenvalue) on their covariance
    reference_cache: str | None = "outputs/.cache/references"  # random-MLP references by
    # content hash, shared by every direction checked at a site (null: no cache)
    bench_layer_offsets: list[int] = field(default_factory=lambda: [-1, 0, 1])
    bench_angles: list[float] = field(
        default_factory=lambda: [15.0, 25.0, 35.0, 45.0, 55.0, 65.0, 75.0]
    )
    bench_edits: list[str] = field(default_factory=lambda: ["mean_diff", "top_natural"])
    edit_strengths: list[float] = field(default_factory=lambda: [1.0, 2.0])  # a real edit
    # writes strength × the residual's own pattern gap along v_resid
    bench_toy: bool = True
    # ---- end of issue 20's block ----
    # ioi_layer_profile (reads `layers` above too); signal_threshold is also ioi_locate's rule
    first_layer: int | None = None
    last_layer: int | None = None
    window: int = 2
    locate_run: str | None = None
    signal_threshold: float = 0.2


@dataclass
class CheckConfig:
    """illusion_check's thresholds (`check.*`): declared here, set only in
    `conf/check/default.yaml` (which documents each; docs/verdict-rule.md gives the reasons)."""

    min_effect: float = MISSING
    effect_quantile: float = MISSING
    component_fraction: float = MISSING
    null_norm_sq: float = MISSING
    superadditive: float = MISSING
    dormant_ratio: float = MISSING
    off_distribution: float = MISSING
    random_fraction: float = MISSING
    generalisation: float = MISSING
    ci_level: float = MISSING
    n_boot: int = MISSING


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
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    extra: ExtraConfig = field(default_factory=ExtraConfig)  # experiments' own options
    check: CheckConfig = field(default_factory=CheckConfig)  # illusion checks' thresholds
    sites: list[str] = field(default_factory=list)  # site kinds the experiment can use; [] = any
    ignores: list[str] = field(default_factory=list)  # top-level keys the experiment never reads


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
