"""Each experiment's own options (`extra.*`): one small dataclass per runner.

`mlpim.config.register_configs` stores each in Hydra's ConfigStore (group `extra`, named after the
experiment), and `conf/config.yaml` selects the chosen experiment's (`- extra: ${experiment}`):
its fields are the experiment's defaults, typed, and its YAML file sets and documents them (a
test checks that the two agree). A key the experiment does not have is refused before any work,
with the experiment's options listed (`check_keys`, called by `mlpim.preflight`): Hydra accepts
`extra.x=` on this node (it is not in struct mode) so that this one check answers `extra.x=`,
`+extra.x=` and `++extra.x=` alike. A runner reads its options with `options(cfg, Options)`.

This module is light on purpose (no torch): the CLI registers the options before Hydra composes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from omegaconf import OmegaConf

from mlpim.errors import ConfigError

T = TypeVar("T")
REFERENCE_MODES = ("batched", "serial")  # how the random-MLP reference trains its seeds


@dataclass
class NoOptions:
    """An experiment without options of its own (ioi_baseline; the subspace runner)."""


@dataclass
class IoiLocateOptions:
    """ioi_locate's options (`conf/experiment/ioi_locate.yaml`)."""

    n_pairs_per_direction: int = 20  # ABB->BAB and BAB->ABB test pairs each
    signal_threshold: float = 0.2  # FLDD that carries the signal (the landmark rule)


@dataclass
class IoiNullspaceOptions:
    """ioi_nullspace's options (`conf/experiment/ioi_nullspace.yaml`)."""

    hist_split: str = "test"  # split of the ABB/ABA histogram prompts
    n_hist_prompts: int = 200  # ABB and ABA alternate


@dataclass
class IoiRandomMlpOptions:
    """ioi_random_mlp's options (`conf/experiment/ioi_random_mlp.yaml`)."""

    random_mlp_seeds: int = 3  # random MLPs (seeds seed..seed+n-1), each with its own DAS run


@dataclass
class IoiNeuronBudgetOptions:
    """ioi_neuron_budget's options (`conf/experiment/ioi_neuron_budget.yaml`)."""

    n_grid: list[Any] = field(default_factory=lambda: [8, 32, 128, 512, "all"])
    subset: str = "first"  # first: neurons 0..n-1; random: a random n-subset (nested over n)


@dataclass
class IoiDormantOptions:
    """ioi_dormant's options (`conf/experiment/ioi_dormant.yaml`)."""

    # where v_true lives (resid_post): an interpolation, resolved when composed
    resid_layer: int | None = "${model.landmarks.handover_layer}"  # type: ignore[assignment]
    resid_direction: str | None = None  # saved v_true (resid_post at resid_layer); None: train
    n_per_combo: int = 50  # pairs per (base, source) combo
    split: str = "test"  # names/templates the combo pairs are drawn from


@dataclass
class IoiPathPatchingOptions:
    """ioi_path_patching's options (`conf/experiment/ioi_path_patching.yaml`)."""

    resid_direction: str | None = None  # saved v_resid; None: trained here
    frozen_norm: bool = False  # path effects also freeze the final-norm scale


@dataclass
class IoiLayerProfileOptions:
    """ioi_layer_profile's options (`conf/experiment/ioi_layer_profile.yaml`)."""

    layers: list[int] | None = None  # None: first_layer..last_layer
    first_layer: int | None = None  # None: start of the default range, minus window
    last_layer: int | None = None  # None: end of the default range, plus window
    locate_run: str | None = None  # an ioi_locate run: its signal range is the default range
    window: int = 2  # layers added on each side of the default range
    signal_threshold: float = 0.2  # FLDD that counts as carrying the signal


@dataclass
class IoiAlignmentOptions:
    """ioi_alignment's options (`conf/experiment/ioi_alignment.yaml`)."""

    resid_direction: str | None = None  # saved resid_post subspace; None: trained here
    n_random: int = 1000  # random unit hidden directions for the baseline
    n_grad_prompts: int = 100  # train prompts averaged for the gradient direction
    n_head_pairs: int = 20  # pairs per direction to pick name movers when the model lists none


@dataclass
class MlpRecoveryOptions:
    """mlp_recovery's options (`conf/experiment/mlp_recovery.yaml`)."""

    corpus_path: str | None = None  # a text file; None: Python's pydoc_data help topics
    chunk_len: int = 64  # tokens per chunk (BOS prepended, never sampled)
    positions_per_chunk: int = 16
    n_activations: int = 2000  # token positions: n_train for training, the rest held out
    n_train: int = 1600
    layers: list[int] | None = None  # None: every layer_step-th layer plus the last
    layer_step: int = 3
    n_directions: int = 5  # random directions v per layer for the ridge regression
    n_logistic_directions: int = 1  # random directions v per layer and z for the classifier
    z_values: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    logistic_c: float = 1e4  # inverse regularisation strength
    norm_scale: str = "mean"  # mean | token
    fast: bool = True  # the MLP on cached resid_mid + delta; False: a hooked full forward
    batch_size: int = 16  # chunks per forward pass


@dataclass
class FactPatchingOptions:
    """fact_patching's options (`conf/experiment/fact_patching.yaml`)."""

    layers: list[int] | None = None  # None: every layer_step-th layer from 0
    layer_step: int = 8
    pair_steps: int = 30  # Adam steps of the per-pair directions
    known_only: bool = True  # keep only facts the model gets right


@dataclass
class FactEditingOptions(FactPatchingOptions):
    """fact_editing's options: fact_patching's, and the edit's (`conf/experiment/fact_editing.yaml`)."""

    pair_run: str | None = None  # a fact_patching run: reuse its per-pair directions
    corpus_path: str | None = None  # text for C; None: Python's pydoc_data help topics
    chunk_len: int = 64  # tokens per corpus chunk
    n_cov_tokens: int = 4096  # tokens of the second moment C of mlp_post
    cov_ridge: float = 1e-3  # only when C is singular: C + λ·I, λ = cov_ridge · tr(C)/d_mlp
    batch_size: int = 16  # corpus chunks per forward
    n_neighbours: int = 10  # other facts of the same relation per edit (specificity)


@dataclass
class ToyIllusionOptions:
    """toy_illusion's options (`conf/experiment/toy_illusion.yaml`)."""

    n_seeds: int = 50  # DAS restarts on the 3-D toy
    das_steps: int = 300  # Adam steps per restart
    das_lr: float = 0.05
    iia_tol: float = 0.05  # |patched output - counterfactual| < tol counts for IIA
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    extra_dims: int = 0  # unused neurons added to the higher-dim hidden layer


@dataclass
class IllusionCheckOptions:
    """illusion_check's options (`conf/experiment/illusion_check.yaml`)."""

    resid_direction: str | None = None  # a saved 1-D resid direction for the alignment row
    n_random: int = 1000  # random unit hidden directions for the alignment baseline
    n_random_directions: int = 32  # random unit directions patched at the site: the gate
    n_natural: int = 8  # top principal directions of source-minus-base differences
    n_natural_prompts: int = 1000  # IOI prompts: the site's natural END activations
    random_mlp_seeds: int = 5  # random MLPs, each with its own 1-D DAS run; 0 skips
    random_mlp_epochs: int | None = None  # DAS epochs per random MLP; None: method.epochs
    reference_cache: str | None = "outputs/.cache/references"  # random-MLP references by hash
    reference_mode: str = "batched"  # random-MLP seeds: batched (one problem) | serial (runs)
    activation_cache: str | None = "outputs/.cache/activations"  # the site's prepared pairs,
    # natural activations and references, by content hash (null: none)


@dataclass
class IllusionBenchmarkOptions:
    """illusion_benchmark's options (`conf/experiment/illusion_benchmark.yaml`)."""

    layers: list[int] | None = None  # absolute MLP layers (any task); None: the landmark + offsets
    bench_layer_offsets: list[int] = field(default_factory=lambda: [-1, 0, 1])
    bench_angles: list[float] = field(default_factory=lambda: [25.0, 45.0, 65.0])  # mixing
    pathway_strengths: list[float] = field(default_factory=lambda: [0.25, 0.3, 0.4, 0.6, 1.0, 2.0])
    pathway_angles: list[float] = field(default_factory=lambda: [25.0, 45.0, 65.0])
    bench_edits: list[int] = field(default_factory=lambda: [0])  # natural-direction ranks
    edit_strengths: list[float] = field(
        default_factory=lambda: [0.5, 1.0, 2.0]
    )  # × the residual gap
    null_norms: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.6])  # hard negatives ‖n‖²
    min_clean_ratio: float = 0.5  # refuse an edit whose clean LD falls below this × unedited
    bench_k: list[int] = field(default_factory=lambda: [4])  # planted k-dim subspaces' dimensions
    bench_toy: bool = True  # add the toy model's planted cases
    n_random_directions: int = 16
    n_natural: int = 4
    n_natural_prompts: int = 2000  # IOI prompts per split: natural activations
    natural_ridge: float = 1.0  # ridge λ = this × mean eigenvalue on their covariance
    random_mlp_seeds: int = 0  # a site note that never changes a label: off by default here
    random_mlp_epochs: int | None = None  # None: method.epochs, as long as v_resid trains
    reference_cache: str | None = "outputs/.cache/references"


OPTIONS: dict[str, type] = {  # runner -> its options (its `EXPERIMENT.options`; a test checks)
    "subspace": NoOptions,
    "ioi_baseline": NoOptions,
    "ioi_locate": IoiLocateOptions,
    "ioi_nullspace": IoiNullspaceOptions,
    "ioi_random_mlp": IoiRandomMlpOptions,
    "ioi_neuron_budget": IoiNeuronBudgetOptions,
    "ioi_dormant": IoiDormantOptions,
    "ioi_path_patching": IoiPathPatchingOptions,
    "ioi_layer_profile": IoiLayerProfileOptions,
    "ioi_alignment": IoiAlignmentOptions,
    "mlp_recovery": MlpRecoveryOptions,
    "fact_patching": FactPatchingOptions,
    "fact_editing": FactEditingOptions,
    "toy_illusion": ToyIllusionOptions,
    "illusion_check": IllusionCheckOptions,
    "illusion_benchmark": IllusionBenchmarkOptions,
}


def option_names(cls: type) -> list[str]:
    """The option names of an options dataclass, in declaration order."""
    return [f.name for f in fields(cls)]


def unknown_message(experiment: str, key: str, cls: type) -> str:
    """The one line refusing `extra.<key>` for `experiment`: a close match and every option."""
    known = option_names(cls)
    if not known:
        return f"{experiment} has no option extra.{key}: it takes no extra.* options"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean extra.{close[0]}? " if close else ""
    listed = ", ".join(f"extra.{k}" for k in known)
    return f"{experiment} has no option extra.{key}: {hint}its options: {listed}"


def check_keys(experiment: str, keys, cls: type) -> None:
    """Raise `ConfigError` for the first of `keys` that is not an option of `cls`."""
    unknown = [k for k in keys if k not in option_names(cls)]
    if unknown:
        raise ConfigError(unknown_message(experiment, str(unknown[0]), cls))


def options(cfg, cls: type[T]) -> T:
    """`cfg.extra` as an instance of the experiment's options dataclass `cls`: interpolations
    resolved, types checked; a key `cls` lacks is a `ConfigError` listing its options."""
    node = cfg.get("extra")
    data = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    check_keys(cfg.experiment, data, cls)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
