"""The registry of illusion checks: one module per check, each registering one `Spec`.

A check module (this folder) holds the check's pure judging function and its `Spec`: name,
scope (direction checks decide the verdict, site checks describe the site, info never warns),
the half of the illusion it speaks for (bridging or dormant), its thresholds and their meaning,
its one-line meaning and whether the figure draws its reference on the value's axis. Every
module here is found and imported below; the name tuples and `Thresholds` are derived from the
registry. Its thresholds are set in conf/check/default.yaml (`mlpim.config.CheckConfig` is read
from there; tests/test_checks.py checks that the two agree). It is measured in
`mlpim.analysis.measure`. The verdict that combines the checks: `mlpim.analysis.illusion`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from dataclasses import fields, make_dataclass

from mlpim.analysis.checks.base import SPECS, Spec, Threshold
from mlpim.errors import ConfigError

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

SHARED = (
    Threshold("ci_level", "bootstrap interval of every FLDD, margin and ratio"),
    Threshold("n_boot", "bootstrap resamplings of the templates and pairs", int),
)
REGISTRY: tuple[Spec, ...] = tuple(sorted(SPECS.values(), key=lambda s: s.order))
CHECKS = tuple(s.name for s in REGISTRY)
MEANINGS = {s.name: s.meaning for s in REGISTRY}
SCOPE = {s.name: s.scope for s in REGISTRY}
DIRECTION = tuple(n for n in CHECKS if SCOPE[n] == "direction")
SITE = tuple(n for n in CHECKS if SCOPE[n] == "site")
BRIDGING = tuple(s.name for s in REGISTRY if s.half == "bridging")  # the bridging half
DORMANT = tuple(s.name for s in REGISTRY if s.half == "dormant")  # the dormant half
ON_VALUE_SCALE = tuple(s.name for s in REGISTRY if s.on_value_scale)
JUDGES = {s.judge.__name__: s.judge for s in REGISTRY}


def thresholds_of(specs: Iterable[Spec]) -> tuple[Threshold, ...]:
    """Every threshold of the checks, in their order, then the shared interval settings."""
    return (*(t for s in specs for t in s.thresholds), *SHARED)


def _from_mapping(cls, values: Mapping):
    """Thresholds from `check.*` (a mapping holding every field; a missing one is an error)."""
    missing = [f.name for f in fields(cls) if f.name not in values]
    if missing:
        raise ConfigError(f"check.{missing[0]} is not set: add it to mlpim/conf/check/default.yaml")
    return cls(**{f.name: values[f.name] for f in fields(cls)})


def thresholds_class(specs: Iterable[Spec]) -> type:
    """A frozen dataclass with one field per threshold of `specs` (and the shared ones)."""
    cls = make_dataclass(
        "Thresholds",
        [(t.name, t.kind) for t in thresholds_of(specs)],
        frozen=True,
        namespace={"from_mapping": classmethod(_from_mapping)},
    )
    cls.__module__ = __name__
    cls.__doc__ = "The checks' thresholds and interval settings (config `check.*`)."
    return cls


THRESHOLDS = thresholds_of(REGISTRY)
Thresholds = thresholds_class(REGISTRY)
