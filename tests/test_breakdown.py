"""Issue 31 item 2: which part of a k-dim V does it (`mlpim.analysis.breakdown`).

The principal directions of V's patched movement are orthonormal, inside span(V), with shares
that sum to 1 (hand-made activations); a planted illusion-like subspace, an effective direction
and a do-nothing one rotated by 45° so that no column is the effective one, has it recovered as
the top direction with the larger FLDD (tiny model, rank-1 edit); `mlpim check` writes the table
for k = 3 and not for k = 1.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import PROBE, REFS, SMALL, cli, end_token_pairs, ld_gradient

from mlpim import constants as C
from mlpim.analysis import illusion_site as S
from mlpim.analysis import measure as M
from mlpim.analysis import nullspace as ns
from mlpim.analysis import planted
from mlpim.analysis.breakdown import CHECKED, breakdown, principal_directions
from mlpim.analysis.checks import Thresholds
from mlpim.analysis.editing import edited_w_out
from mlpim.config import compose
from mlpim.engine.interventions import prepare
from mlpim.experiments.common import das_settings
from mlpim.report.illusion import BREAKDOWN, BREAKDOWN_PLOT
from mlpim.tasks import task_splits

D_MLP = 128  # conf/model/tiny.yaml


def fake_site(base: torch.Tensor, source: torch.Tensor) -> SimpleNamespace:
    """What `principal_directions` reads of a site: the test pairs' activations."""
    return SimpleNamespace(splits={"test": [SimpleNamespace(base_act=base, source_act=source)]})


@pytest.mark.parametrize("n", [30, 2])
def test_principal_directions_are_an_orthonormal_basis_of_v_by_movement(n):
    """Orthonormal, spanning V, shares summing to 1 in decreasing order, each share the
    direction's squared movement over V's (by hand); fewer pairs than k: zero shares last."""
    g = torch.Generator().manual_seed(0)
    base, source = (torch.randn(n, 12, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    p = principal_directions(fake_site(base, source), v)
    u = p.directions
    torch.testing.assert_close(u.T @ u, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(v @ (v.T @ u), u)  # inside span(V)
    assert p.share.sum() == pytest.approx(1.0) and (np.diff(p.share) <= 1e-12).all()
    moved = ((source - base) @ u).pow(2).sum(0).numpy()
    assert np.allclose(p.share, moved / ((source - base) @ v).pow(2).sum().item())
    assert ((source - base) @ u).sum(0).min() >= -1e-12  # signed along the movement
    assert (p.share[2:] < 1e-12).all() if n == 2 else (p.share > 0).all()


@pytest.fixture
def planted_site(tiny_gpt2):
    """Pairs whose END token differs, in a model whose MLP 1 is edited so that a direction e
    writes the answer's gradient (the rank-1 real edit of test_measure); a site of k = 2 refs;
    e, and z: unread by the edited W_out and orthogonal to e."""
    model, cfg = tiny_gpt2, compose([*SMALL, "dataset.n_test_pairs=40"])
    raw = task_splits(model.tokenizer, cfg.dataset, 0)
    pairs = {k: [end_token_pairs(model, pb) for pb in raw[k]] for k in ("train", "test")}
    base, source = M.acts(prepare(model, pairs["test"], "mlp_post", 1, "auto"))
    e = planted.centred((source - base).mean(0), torch.cat([base, source]).mean(0))
    target = ld_gradient(model, pairs["test"], 1)
    clean = torch.cat([p.clean_ld for p in prepare(model, pairs["test"], "mlp_post", 1, "auto")])
    alpha = -clean.mean().item() / (((source - base) @ e).mean().item() * target.norm().item())
    th = Thresholds.from_mapping(cfg.check)
    opts = S.CheckOptions(n_random_directions=4, n_natural=2, random_mlp_seeds=0, seed=0, k=2)
    with edited_w_out(model, 1, planted.edit_delta(e, target, alpha)):
        splits = {k: prepare(model, b, "mlp_post", 1, "auto") for k, b in pairs.items()}
        w_out = ns.mlp_w_out(model, 1)
        _, z = ns.split(torch.randn(D_MLP, generator=torch.Generator().manual_seed(0)), w_out)
        z = z - (z @ e) * e
        natural = torch.cat(M.acts(splits["train"]))
        method = das_settings(cfg, dim=2)
        site, _ = S.check_site(model, splits, "mlp_post", 1, th, opts, natural, method)
        yield model, site, e, z / z.norm()


def test_a_planted_effect_hidden_by_a_rotation_is_found(planted_site):
    """V = e and z rotated by 45° (no column is e): u1 is e (|cos| > 0.9), carries most of the
    movement and the larger FLDD; u2, unread, does nothing and is not bridging."""
    model, site, e, z = planted_site
    v = torch.stack([e + z, e - z], 1) / 2**0.5
    assert max(abs(ns.cosine(v[:, j], e)) for j in range(2)) < 0.75
    table = breakdown(model, site, v, 4, 0)
    assert list(table.direction) == ["u1", "u2"] and table.share.sum() == pytest.approx(1.0)
    top = principal_directions(site, v).directions[:, 0]
    assert abs(ns.cosine(top, e)) > 0.9
    u1, u2 = table.iloc[0], table.iloc[1]
    assert u1.share > 0.9 and u1.fldd > 0.5 and u1.fldd > u2.fldd + 0.4
    assert abs(u2.fldd) < 0.05 and u2.null_norm_sq > 0.9
    assert u1.effect_warning == "passes" and u2.effect_warning.startswith("below the gate")
    assert {f"{c}_warning" for c in CHECKED} <= set(table.columns)


def check(capsys, tmp_path: Path, basis: torch.Tensor) -> tuple[Path, str]:
    """`mlpim check` of `basis` saved as a .npy at mlp_post L1 (tiny model): run dir, console."""
    np.save(tmp_path / f"k{basis.shape[1]}.npy", basis.numpy())
    out = tmp_path / f"run_k{basis.shape[1]}"
    site = ["direction_site=mlp_post", "direction_layer=1", "extra.n_natural_prompts=40"]
    args = [str(tmp_path / f"k{basis.shape[1]}.npy"), *PROBE, *REFS, *site]
    code, text = cli(capsys, "check", *args, f"hydra.run.dir={out}")
    assert code == 0, text
    return out, text


def test_check_writes_the_breakdown_for_a_subspace_only(tmp_path, capsys):
    """k = 3: breakdown.csv with 3 rows (shares summing to 1), its figure, its section in
    verdict.md and summary.md and on the console; k = 1: none of it."""
    q = torch.linalg.qr(torch.randn(D_MLP, 3, generator=torch.Generator().manual_seed(5)))[0]
    out, text = check(capsys, tmp_path, q)
    table = pd.read_csv(out / BREAKDOWN)
    assert list(table.direction) == ["u1", "u2", "u3"] and table.share.sum() == pytest.approx(1)
    assert np.isfinite(table[["fldd", "null_norm_sq", *CHECKED]].to_numpy()).all()
    assert (out / BREAKDOWN_PLOT).exists() and "Which part of V does it" in text
    for name in (C.VERDICT, C.SUMMARY):
        assert "## Which part of V does it" in (out / name).read_text()
    one, text = check(capsys, tmp_path, q[:, :1])
    assert not (one / BREAKDOWN).exists() and not (one / BREAKDOWN_PLOT).exists()
    assert "Which part of V" not in text + (one / C.VERDICT).read_text()
