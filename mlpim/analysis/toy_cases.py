"""The post's toy model as planted cases for the benchmark: its real and illusory directions.

The toy has a scalar read-out, so W_out's row space is one line, span(1, 0, 2), not e3: the row
part of the illusory (e2+e3)/√2 mixes the real e1 with the dormant e3, moves as much as real
inputs move it, and alone reproduces the whole effect. By the row/null split no check can tell
this illusion from a real direction (the post's appendix: which basis is "meaningful" is a prior
about units); the benchmark reports the toy cases apart from the language model's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlpim.analysis import controls, divergence, toy
from mlpim.analysis import nullspace as ns
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.checks.base import Check
from mlpim.analysis.checks.component_vs_subspace import component_check
from mlpim.analysis.checks.dormant_row_part import dormant_check
from mlpim.analysis.checks.effect import effect_check
from mlpim.analysis.checks.nullspace_bridging import bridging_margin, nullspace_check
from mlpim.analysis.checks.off_distribution import off_distribution_check
from mlpim.analysis.references import Reference, Refs, natural_directions
from mlpim.analysis.stats import fixed, resample
from mlpim.analysis.toy import FLIP_PAIRS
from mlpim.engine.patching import subspace_patch


def toy_effect(model, base: Tensor, source: Tensor, basis: Tensor) -> float:
    """FLDD analogue on a toy model: mean (y_patched − y_base) / (y_source − y_base)."""
    patched = subspace_patch(base, source, basis)
    y = model.readout
    return ((y(patched) - y(base)) / (y(source) - y(base))).mean().item()


def _effects(model, base, source, u: Tensor, w_out: Tensor) -> tuple[dict, Tensor, Tensor]:
    proj, null = ns.split(u, w_out)
    bases = controls.intervention_bases(u, proj, null)
    return {k: toy_effect(model, base, source, b) for k, b in bases.items()}, proj, null


def toy_checks(model, u: Tensor, th: Thresholds) -> list[Check]:
    """The gate and the MLP checks of unit u on the toy model's flip pairs."""
    xb, xs = (torch.tensor(x, dtype=u.dtype) for x in zip(*FLIP_PAIRS, strict=True))
    base, source, w_out = model.hidden(xb), model.hidden(xs), model.w_out[:, None]
    natural = torch.cat([base, source])
    idx, nat_idx = resample(len(base), th.n_boot, 0), resample(len(natural), th.n_boot, 1)
    margins = []
    for n in natural_directions(base, source, model.d):
        f, _, _ = _effects(model, base, source, n, w_out)
        margins.append(bridging_margin(f["das"], f.get("row_proj", 0.0), th.superadditive))
    refs = Refs(natural_bridging=Reference("natural", tuple(margins)))
    f, proj, null = _effects(model, base, source, u, w_out)
    full = toy_effect(model, base, source, torch.eye(model.d, dtype=u.dtype))
    off, full_off = divergence.off_distribution(base, source, u, w_out, natural, idx, nat_idx)
    dormant = divergence.dormant_est(base, source, u, proj, idx)
    return [
        effect_check(f["das"], refs, th),
        component_check(f["das"], full, th),
        nullspace_check(f["das"], f.get("row_proj", 0.0), null.norm().item() ** 2, refs, th),
        dormant_check(fixed(dormant.value), refs, th),
        off_distribution_check(fixed(off.value), fixed(full_off.value), refs, th),
    ]


def toy_cases() -> dict[str, tuple[object, Tensor, str]]:
    """name -> (toy model, unit direction, truth): the post's model and its k = 2, 4 versions."""
    model = toy.post_model()
    cases = {
        "toy e1": (model, toy.unit(1, 0, 0), "real"),
        "toy (e2+e3)/√2": (model, toy.unit(0, 1, 1), "illusory"),
    }
    for k in (2, 4):
        hd = toy.higher_dim(k)
        ill = hd.illusory.sum(1)
        cases[f"toy k={k} real"] = (hd.model, hd.real[:, 0], "real")
        cases[f"toy k={k} illusory"] = (hd.model, ill / ill.norm(), "illusory")
    return cases
