"""`preflight(cfg, overrides)`: what can be checked from the config and the file system, checked
before the model loads. Each failure is an `MlpimError` naming the value and what is allowed:
keys the schema does not know (also when added with `+`/`++`), values that cannot train or run
(epochs, learning rates, batch sizes), the device, the model file, the task file and direction
files (read once, into the `Direction`s the runner receives, and checked: finite, non-zero,
full rank, at their site and layer, within the model's declared sizes), and the run's estimated
peak memory against what its device has free (`check_memory`, `mlpim.engine.memory`).

An experiment config declares `sites:` (the site kinds it can patch; empty = any) and `ignores:`
(top-level keys it never reads, e.g. `site` for `ioi_alignment`); a command-line override of an
ignored key is refused rather than silently dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import get_args, get_type_hints

import torch
from omegaconf import DictConfig, OmegaConf

from mlpim.config import check_unknown_keys
from mlpim.engine import memory
from mlpim.engine.direction import OPTION_NAMES, Direction, load_direction
from mlpim.engine.interventions import ENGINES
from mlpim.engine.models import (
    ModelSpec,
    check_device_map,
    gguf_path,
    resolve_device,
    resolve_dtype,
)
from mlpim.errors import ConfigError, MlpimError
from mlpim.experiments import Experiment, get_experiment, runner_names
from mlpim.experiments.common import no_landmark
from mlpim.options import REFERENCE_MODES
from mlpim.tasks import FILE_TASKS, task_vocabulary
from mlpim.tasks.mib import check_mib_task
from mlpim.tasks.pairs import check_pairs_file


def override_key(override: str) -> str:
    """`++extra.n_random=5` -> `extra.n_random`; `site=resid_post` -> `site`."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def ignored_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The overrides whose key (or its top-level key) the experiment declares it ignores."""
    ignores = list(cfg.get("ignores") or [])
    out = []
    for o in overrides:
        key = override_key(o)
        top = key.split(".", 1)[0].split("/", 1)[0]
        if any(top == i or top.startswith(f"{i}_") for i in ignores):
            out.append(o)
    return out


def experiment_of(cfg: DictConfig) -> Experiment | None:
    """The `Experiment` of the config's runner (its module imported), None for an unknown runner
    (refused when the run starts)."""
    runner = cfg.get("runner")
    return get_experiment(runner) if runner in runner_names() else None


def max_k(cfg: DictConfig) -> int | None:
    """The largest subspace the experiment checks (`Experiment.max_k`; None: it checks none)."""
    experiment = experiment_of(cfg)
    return None if experiment is None else experiment.max_k


def direction_options(cfg: DictConfig) -> dict:
    """The config's `direction_<option>=` values (key, feature, columns, rows) as plain Python
    values (a list, not a ListConfig), None if unset."""
    values = {o: cfg.get(f"direction_{o}") for o in OPTION_NAMES}
    return {
        o: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for o, v in values.items()
    }


def load_directions(cfg: DictConfig) -> dict[str, Direction]:
    """Each direction file or folder the config names (`direction`, `extra.resid_direction`),
    keyed by its config key, read once (`load_direction`) and checked as far as no model is
    needed: readable as what it is, a meaningful direction, at the site and layer given for it,
    within the model's declared sizes and, for a check (`Experiment.max_k`), of at most max_k
    dimensions."""
    most = max_k(cfg)
    named = {}
    if "direction" not in (cfg.get("ignores") or []):
        check_direction_options(cfg)
        site = (cfg.get("direction_site"), cfg.get("direction_layer"))
        named["direction"] = (cfg.get("direction"), direction_options(cfg), *site)
    named["extra.resid_direction"] = ((cfg.get("extra") or {}).get("resid_direction"),)
    return {
        key: checked_direction(cfg, key, *how, max_k=most) for key, how in named.items() if how[0]
    }


def checked_direction(
    cfg: DictConfig, key: str, path: str, options=None, site=None, layer=None, max_k=None
) -> Direction:
    """The direction at `path`, given as `key=`, read and checked (`load_directions`)."""
    sizes, name = model_sizes(cfg), cfg.model.name
    try:
        return load_direction(
            path,
            options,
            site,
            layer,
            max_k=max_k,
            sizes=sizes,
            model_name=name,
            experiment=cfg.experiment,
        )
    except MlpimError as e:
        raise ConfigError(f"{key}={e}") from None


def check_direction_options(cfg: DictConfig) -> None:
    """`direction_key=`, `direction_site=` and the like only say how to read `direction=`:
    refused without it."""
    places = {o: cfg.get(f"direction_{o}") for o in ("site", "layer")}
    options = {**direction_options(cfg), **places}
    given = [f"direction_{o}" for o, v in options.items() if v is not None]
    if given and not cfg.get("direction"):
        raise MlpimError(f"{', '.join(given)} given without direction=: they say how to read it")


def model_sizes(cfg: DictConfig) -> dict:
    """The sizes the model config declares (`model.sizes`, or the tiny model's), else {}."""
    return dict(cfg.model.get("sizes") or cfg.model.get("tiny") or {})


def site_width(cfg: DictConfig) -> int | None:
    """The site's width when the model config gives it, else None."""
    return model_sizes(cfg).get("d_mlp" if cfg.site.kind == "mlp_post" else "d_model")


def check_positive(cfg: DictConfig) -> None:
    """Epochs, steps, learning rates and batch sizes that cannot train or run are refused: the
    dataset's batch size, the experiment's `Experiment.positive` options, DAS's settings."""
    ignores = set(cfg.get("ignores") or [])
    values = {"dataset.batch_size": 1, **positive_options(experiment_of(cfg))}
    if "method" not in ignores and cfg.method.name in ("das", "mean_diff"):
        values |= {"method.epochs": 1, "method.lr": 0.0, "method.stop_patience": 1}  # DAS's
    for key, low in values.items():
        if key.split(".")[0] in ignores:
            continue
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        ok = value >= low if isinstance(low, int) else value > low  # NaN fails both
        if not ok:
            need = f"at least {low}" if isinstance(low, int) else "above 0"
            raise MlpimError(f"{key}={value}: must be {need} (nothing would be learned or run)")


def positive_options(experiment: Experiment | None) -> dict[str, int | float]:
    """`extra.<option>` -> its lowest allowed value: above 0.0 for a float option, else 1."""
    if experiment is None:
        return {}
    hints = get_type_hints(experiment.options)
    return {
        f"extra.{name}": 0.0 if float in (hints[name], *get_args(hints[name])) else 1
        for name in experiment.positive
    }


def check_device(cfg: DictConfig) -> None:
    """`device=` names a device torch knows and this machine has."""
    if "device" in (cfg.get("ignores") or []) or cfg.device == "auto":
        return
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise MlpimError(f"device={cfg.device}: not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MlpimError(
            f"device={cfg.device}: CUDA is not available on this machine (torch "
            f"{torch.__version__}); use device=cpu, or device=auto to use a GPU when there is one"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MlpimError(
            f"device={cfg.device}: Apple's MPS is not available on this machine (torch "
            f"{torch.__version__}); use device=cpu, or device=auto to use a GPU when there is one"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise MlpimError(f"device={cfg.device}: mlpim runs on cpu, cuda or mps; use one of them")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise MlpimError(
            f"device={cfg.device}: this machine has {torch.cuda.device_count()} GPU(s)"
        )


def check_model_file(cfg: DictConfig) -> Path | None:
    """A GGUF model file exists and is a GGUF file (a GGUF without its file is refused); its
    path, None for a model of another source."""
    if "model" in (cfg.get("ignores") or []) or cfg.model.source != "gguf":
        return None
    if OmegaConf.is_missing(cfg.model, "file"):
        raise MlpimError("model=gguf needs the file: model.file=/path/to/model.gguf")
    return gguf_path(ModelSpec.from_mapping(OmegaConf.to_container(cfg.model, resolve=True)))


MEMORY_BUDGET = "MLPIM_MEMORY_BUDGET"  # environment variable: the memory free, e.g. 8GiB
PLAIN_MLP = ("gpt2", "neox")  # tiny families whose MLP has two matrices, not three


def check_memory(cfg: DictConfig, model_file: Path | None) -> None:
    """Refuse in one line a run whose estimated peak memory (`memory.estimate`) exceeds what
    its device has free (or `MLPIM_MEMORY_BUDGET`); silent where the model's shape or the free
    memory is unknown."""
    shape = None if "model" in (cfg.get("ignores") or []) else model_shape(cfg, model_file)
    budget, devices = os.environ.get(MEMORY_BUDGET), placement(cfg)
    free = memory.parse_size(budget, MEMORY_BUDGET) if budget else free_on(devices)
    if shape is None or free is None:
        return
    device = ", ".join(devices)
    dtype = resolve_dtype(cfg.model.get("dtype", "auto"), devices[0])
    need = memory.estimate(shape, memory.DTYPE_BYTES[dtype], workload(cfg))
    if sum(need.values()) <= free:
        return
    where = f"({MEMORY_BUDGET}={budget})" if budget else f"on {device}"
    parts = ", ".join(f"{k} {memory.size_text(v)}" for k, v in need.items() if v)
    smaller = ", model.dtype=bfloat16" if memory.DTYPE_BYTES[dtype] > 2 else ""
    raise MlpimError(
        f"{cfg.model.name} ({dtype}) needs about {memory.size_text(sum(need.values()))}, "
        f"{memory.size_text(free)} free {where}: it cannot fit ({parts}); try fewer pairs"
        f"{smaller} or a larger machine (docs/engine.md, Memory)"
    )


def placement(cfg: DictConfig) -> list[str]:
    """The devices the model's weights go to: `device=`, or those `model.device_map` names
    (auto: every GPU, else the CPU)."""
    device_map = cfg.model.get("device_map")
    if device_map is None:
        return [resolve_device(cfg.device)]
    if device_map == "auto":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    named = [torch.device(f"cuda:{v}" if isinstance(v, int) else v) for v in device_map.values()]
    return sorted({f"cuda:{d.index or 0}" if d.type == "cuda" else d.type for d in named})


def free_on(devices: list[str]) -> int | None:
    """The memory free on all of `devices` together; None where one's is unknown."""
    free = [memory.free_bytes(d) for d in devices]
    return None if None in free else sum(free)


def model_shape(cfg: DictConfig, model_file: Path | None) -> memory.ModelShape | None:
    """The model's shape from its GGUF file's header, its folder (`model.path`) or its declared
    sizes (`model.sizes`, the tiny model's); None where none of them tells."""
    if model_file is not None:
        return memory.gguf_shape(model_file)
    path = cfg.model.get("path") if not OmegaConf.is_missing(cfg.model, "path") else None
    if cfg.model.source == "hf" and path:
        return memory.hf_shape(Path(path).expanduser())
    sizes = model_sizes(cfg)
    if not {"n_layers", "d_model", "d_mlp"} <= set(sizes):
        return None
    plain = cfg.model.get("arch") in PLAIN_MLP
    heads, kv_heads = sizes.get("n_heads"), sizes.get("n_kv_heads")
    kv = sizes["d_model"] // heads * kv_heads if heads and kv_heads and not plain else None
    vocab = sizes.get("vocab", 0)
    if cfg.model.source == "tiny":  # `word_tokenizer`: each word with and without a space
        vocab = 2 * len(task_vocabulary(cfg.dataset)) + 1
    return memory.declared_shape(
        sizes["n_layers"], sizes["d_model"], sizes["d_mlp"], vocab, kv, not plain
    )


def workload(cfg: DictConfig) -> memory.Workload:
    """What the run holds besides the weights: its pairs (train and test, and twice as many as
    the test pairs for the check's two held-out sets; a task file's lines), a forward's batch,
    the natural prompts' activations."""
    data = {} if "dataset" in (cfg.get("ignores") or []) else cfg.dataset
    n_pairs = data.get("n_train_pairs", 0) + 3 * data.get("n_test_pairs", 0)
    if data and data.name in FILE_TASKS and Path(data.path).is_file():  # a pair (or row) a line
        with open(data.path, encoding="utf-8-sig") as f:
            n_pairs = sum(1 for line in f if line.strip())
    batch = max(data.get("batch_size", 0), memory.Workload.batch)
    n_natural = (cfg.get("extra") or {}).get("n_natural_prompts") or 0
    return memory.Workload(n_pairs, batch=batch, n_natural=n_natural)


TASK_CHOICES = {"invalid": ("error", "drop"), "keep": ("all", "known")}


def check_task_file(cfg: DictConfig) -> None:
    """`dataset.path` of a task read from a file: given (pairs, mib), and readable (a file; a
    mib task may be a save_to_disk folder); dataset.invalid/keep: allowed values, and only for
    the tasks read from a user's file."""
    if "dataset" in (cfg.get("ignores") or []):
        return
    check_task_choices(cfg.dataset)
    name = cfg.dataset.name
    if name not in ("pairs", "facts", "mib"):
        return
    if OmegaConf.is_missing(cfg.dataset, "path") or (name != "facts" and not cfg.dataset.path):
        what = "task file" if name == "pairs" else "MIB rows (a JSONL file or save_to_disk folder)"
        raise MlpimError(f"dataset={name} needs the {what}: dataset.path=/path/to/task.jsonl")
    path = cfg.dataset.path
    if not path or Path(path).is_file() or (name == "mib" and Path(path).is_dir()):
        return read_task(cfg.dataset)
    kind = "a directory" if Path(path).is_dir() else "a device, pipe or socket"
    what = kind if Path(path).exists() else "no such file"
    raise MlpimError(f"dataset.path={path}: {what}; give a JSONL file of pairs (docs/tasks.md)")


def read_task(dataset: DictConfig) -> None:
    """A user's task file read whole by the task's own reader: not UTF-8 (the line), empty, a
    JSON array, no pair at all, a MIB counterfactual type the rows lack."""
    if dataset.name == "pairs":
        check_pairs_file(dataset.path)
    elif dataset.name == "mib":
        check_mib_task(dataset.path, dataset.get("counterfactual"), dataset.get("split"))


def check_task_choices(dataset: DictConfig) -> None:
    """dataset.invalid and dataset.keep name an allowed value, and are only changed for the
    tasks read from a user's file (pairs, mib)."""
    for key, allowed in TASK_CHOICES.items():
        value = dataset.get(key, allowed[0])
        if value not in allowed:
            raise MlpimError(f"dataset.{key}={value}: allowed: {', '.join(allowed)}")
        if value != allowed[0] and dataset.name not in FILE_TASKS:
            raise MlpimError(
                f"dataset.{key}={value} applies to the pairs of a user's file (dataset=pairs or "
                f"dataset=mib), not dataset={dataset.name}"
            )


def check_values(cfg: DictConfig) -> None:
    """The seed (numpy's generators take none below 0), `dataset.test_fraction` (a share),
    `method.*`'s names and tolerance, `extra.reference_mode`, where the experiment reads them."""
    ignores = set(cfg.get("ignores") or [])
    if cfg.seed < 0:
        raise MlpimError(f"seed={cfg.seed}: seeds are 0 or more (one policy for every experiment)")
    fraction = cfg.dataset.get("test_fraction", 0.5)
    if "dataset" not in ignores and not 0 <= fraction <= 1:  # NaN fails too
        raise MlpimError(f"dataset.test_fraction={fraction}: a share of the groups, 0 to 1")
    if "method" not in ignores:
        check_method_values(cfg.method)
    mode = (cfg.get("extra") or {}).get("reference_mode", REFERENCE_MODES[0])
    if mode not in REFERENCE_MODES:
        raise MlpimError(f"extra.reference_mode={mode}: allowed: {', '.join(REFERENCE_MODES)}")


def check_method_values(method: DictConfig) -> None:
    """`method.engine` and `method.early_stop` name what the engine knows; `method.stop_tol` is 0
    or more."""
    if method.engine not in ENGINES:
        raise MlpimError(f"method.engine={method.engine}: allowed: {', '.join(ENGINES)}")
    if method.early_stop not in EARLY_STOP:
        raise MlpimError(f"method.early_stop={method.early_stop}: allowed: {', '.join(EARLY_STOP)}")
    if not method.stop_tol >= 0:  # NaN fails too
        raise MlpimError(f"method.stop_tol={method.stop_tol}: a relative improvement, 0 or more")


EARLY_STOP = ("none", "reference", "all")  # `method.early_stop`: which DAS runs may stop early
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")  # what `model.dtype` may name


def check_dtype(cfg: DictConfig) -> None:
    """`model.dtype` names a floating-point torch dtype (or auto)."""
    dtype = cfg.model.get("dtype", "auto")
    if dtype not in DTYPES:
        raise MlpimError(f"model.dtype={dtype}: allowed: {', '.join(DTYPES)}")


def check_placement(cfg: DictConfig) -> None:
    """`model.device_map`: auto or a map of CPU or GPU devices (`check_device_map`), with
    device=auto (both would place the model) and without TransformerLens's weight processing
    (`model.compat`), untried on a model split across devices."""
    device_map = cfg.model.get("device_map")
    if device_map is None or "model" in (cfg.get("ignores") or []):
        return
    if OmegaConf.is_config(device_map):
        device_map = OmegaConf.to_container(device_map)
    check_device_map(device_map)
    if cfg.device != "auto":
        raise MlpimError(
            f"device={cfg.device} and model.device_map both place the model: give one of them"
        )
    if cfg.model.get("compat"):
        raise MlpimError(
            f"model.device_map does not combine with model.compat=true ({cfg.model.name}: "
            "TransformerLens's weight processing of a model split across devices is untried); "
            "load it on one device"
        )


def check_site_and_dim(cfg: DictConfig) -> None:
    """The site kind the experiment can use, the layer and `method.dim` where the model tells."""
    ignores = set(cfg.get("ignores") or [])
    allowed = list(cfg.get("sites") or [])
    n_layers = model_sizes(cfg).get("n_layers")
    layer = cfg.site.get("layer")
    if "site" not in ignores and n_layers and layer is not None and not 0 <= layer < n_layers:
        raise MlpimError(
            f"site.layer={layer}: layer {layer} is outside the model: {cfg.model.name} has "
            f"layers 0..{n_layers - 1}"
        )
    if "site" not in ignores and allowed and cfg.site.kind not in allowed:
        raise MlpimError(
            f"site={cfg.site.kind}: {cfg.experiment} works at {', '.join(allowed)} only"
        )
    if "method" in ignores or cfg.method.name not in ("das", "mean_diff"):
        return
    if cfg.method.dim < 1:
        raise MlpimError(f"method.dim={cfg.method.dim}: the subspace needs at least 1 dimension")
    width = site_width(cfg)
    if width and "site" not in ignores and cfg.method.dim > width:
        raise MlpimError(
            f"method.dim={cfg.method.dim} exceeds the width {width} of {cfg.site.kind} on "
            f"{cfg.model.name}; allowed: 1..{width}"
        )


def check_landmarks(cfg: DictConfig) -> None:
    """A layer for the site, and for the benchmark's offsets, where the model has no landmark."""
    extra = cfg.get("extra") or {}
    if "site" not in (cfg.get("ignores") or []) and cfg.site.get("layer") is None:
        raise no_landmark(cfg, cfg.site.kind, "site.layer={}")
    mid = cfg.model.landmarks.get("mlp_in_the_middle")
    if "bench_layer_offsets" in extra and extra.get("layers") is None and mid is None:
        raise no_landmark(cfg, "the benchmark's layer offsets", "extra.layers=[{}]")


def check_layer_options(cfg: DictConfig) -> None:
    """An experiment's `extra.layers` inside the model, where the model config gives its depth."""
    n_layers = model_sizes(cfg).get("n_layers")
    layers = list((cfg.get("extra") or {}).get("layers") or [])
    outside = [x for x in layers if not 0 <= x < n_layers] if n_layers else []
    if outside:
        raise MlpimError(
            f"extra.layers={layers}: layer {outside[0]} is outside the model: "
            f"{cfg.model.name} has layers 0..{n_layers - 1}"
        )


def preflight(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Direction]:
    """Check `cfg` (and the command line's `overrides`) before any model is loaded; the
    directions it names, loaded (`load_directions`: what the runner receives)."""
    ignored = ignored_overrides(cfg, overrides or [])
    if ignored:
        raise MlpimError(
            f"{cfg.experiment} ignores {', '.join(ignored)} (it does not read "
            f"{', '.join(cfg.ignores)}); drop the override or pick another experiment"
        )
    check_unknown_keys(cfg)
    check_positive(cfg)
    check_device(cfg)
    check_dtype(cfg)
    check_placement(cfg)
    check_values(cfg)
    directions = load_directions(cfg)
    check_site_and_dim(cfg)
    check_layer_options(cfg)
    check_task_file(cfg)
    model_file = check_model_file(cfg)
    check_landmarks(cfg)
    check_memory(cfg, model_file)
    return directions
