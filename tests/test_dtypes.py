"""Any dtype, same answer (issue 17): W_out's row space and the nullspace split are computed in
float64 from 16-bit weights as from float32 ones, and ioi_nullspace and illusion_check run end to
end on a bfloat16 tiny model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import SMALL

from mlpim import constants as C
from mlpim.analysis import nullspace as ns
from mlpim.config import compose
from mlpim.engine.patching import subspace_patch
from mlpim.errors import MlpimError
from mlpim.experiments.common import model_for
from mlpim.preflight import preflight
from mlpim.run import run

LOW = [torch.bfloat16, torch.float16]
M, D = 1536, 576  # SmolLM2-135M's d_mlp, d_model


def random_w_out(m: int = M, d: int = D, seed: int = 0) -> torch.Tensor:
    """A random W_out [m, d] (hidden -> residual) with GPT-2's init scale."""
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed)) * 0.02


def wedin_bound(w: torch.Tensor, w_low: torch.Tensor) -> float:
    """‖P_low − P‖₂ ≤ ‖E‖₂ / s_min(W_low) for the projectors on the column spans of W and of its
    rounded copy (Wedin's sin θ theorem, E = W_low − W, both of full column rank)."""
    e = torch.linalg.matrix_norm(w_low.double() - w.double(), ord=2)
    return (e / torch.linalg.svdvals(w_low.double())[-1]).item()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("transposed", [False, True], ids=["m_by_d", "d_by_m"])
def test_16bit_w_out_keeps_its_full_row_space(dtype, transposed):
    """The bug: a tolerance of max(m, d)·eps(bfloat16) = 12·s_max made the rank 0."""
    w = random_w_out().to(dtype)
    w = w.T if transposed else w
    q = ns.row_space_basis(w)
    assert q.dtype == torch.float64 and q.shape == (w.shape[0], D)
    torch.testing.assert_close(q.T @ q, torch.eye(D, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_split_of_a_known_vector_matches_float32(dtype):
    """The split from 16-bit weights differs from float32's by no more than the rounding of the
    weights moves the row space (Wedin), which is a few eps of the dtype."""
    w = random_w_out()
    v = torch.randn(M, generator=torch.Generator().manual_seed(1))
    v = v / v.norm()
    proj32, null32 = ns.split(v, w)
    proj, null = ns.split(v, w.to(dtype))
    assert proj.dtype == null.dtype == torch.float32
    bound = wedin_bound(w, w.to(dtype))
    assert 0 < bound < 2 * torch.finfo(dtype).eps  # random W_out is well conditioned
    assert (proj - proj32).norm().item() <= bound
    assert (null - null32).norm().item() <= bound
    assert 0.3 < null32.norm().item() ** 2 < 0.9  # (1536 - 576) / 1536 of a random v expected
    torch.testing.assert_close(proj + null, v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_centred_writing_weights_lose_one_direction_in_every_dtype(dtype):
    """W_out centred in its own dtype (TransformerLens's compat processing): rank d_model − 1 in
    float32, bfloat16 and float16 alike; the uncentred matrix keeps all d_model."""
    w = random_w_out().to(dtype)
    centred = w - w.mean(1, keepdim=True)
    assert ns.centred_rows(centred) and not ns.centred_rows(w)
    assert ns.row_space_basis(centred).shape[1] == D - 1
    assert ns.row_space_basis(w).shape[1] == D


def test_rank_zero_is_refused_in_one_line():
    with pytest.raises(MlpimError, match="rank 0") as err:
        ns.split(torch.ones(8), torch.zeros(8, 4, dtype=torch.bfloat16))
    assert "\n" not in str(err.value)


def test_float32_direction_patches_a_bfloat16_activation():
    """The patch is computed in float32 and rounded once, as the model would store it."""
    g = torch.Generator().manual_seed(0)
    base, source = (torch.randn(4, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    basis = torch.linalg.qr(torch.randn(32, 2, generator=g))[0]
    out = subspace_patch(base, source, basis)
    b, s = base.float(), source.float()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (b + ((s - b) @ basis) @ basis.T).to(torch.bfloat16))


def test_unknown_dtype_is_refused_before_the_model_loads():
    with pytest.raises(MlpimError, match=r"model.dtype=bf16: allowed: auto, float32, bfloat16"):
        preflight(compose(["model=tiny", "model.dtype=bf16"]))


def norm_sq(run_dir) -> pd.Series:
    df = pd.read_csv(run_dir / C.METRICS)
    return df[df.metric == "norm_sq"].set_index("intervention").value


def test_ioi_nullspace_in_bfloat16_matches_float32(tmp_path):
    """The same direction (a plain tensor file) split against the tiny model's W_out in float32
    and in bfloat16: the squared norms of the parts agree within what rounding W_out moves."""
    v = torch.randn(128, generator=torch.Generator().manual_seed(0))
    torch.save(v / v.norm(), tmp_path / "v.pt")
    given = [*SMALL, "experiment=ioi_nullspace", f"direction={tmp_path / 'v.pt'}"]
    run(compose(given), tmp_path / "f32")
    run(compose([*given, "model.dtype=bfloat16"]), tmp_path / "bf16")
    a, b = norm_sq(tmp_path / "f32"), norm_sq(tmp_path / "bf16")
    assert a.sum() == pytest.approx(1.0, abs=1e-5) and b.sum() == pytest.approx(1.0, abs=1e-5)
    assert 0.2 < b["null_proj"] < 0.8  # the bug put all of it in the nullspace
    cfg = compose(SMALL)
    w32, w16 = (
        ns.mlp_w_out(model_for(c), 1) for c in (cfg, compose([*SMALL, "model.dtype=bfloat16"]))
    )
    assert w16.dtype == torch.bfloat16
    # |‖P̃v‖² − ‖Pv‖²| ≤ 2‖P̃ − P‖₂ for a unit v
    assert abs(a["row_proj"] - b["row_proj"]) <= 2 * wedin_bound(w32, w16)
    assert (tmp_path / "bf16" / C.DONE).exists()


def test_illusion_check_end_to_end_in_bfloat16(tmp_path):
    """Directions trained on the bfloat16 tiny model, then every check on it."""
    low = [*SMALL, "model.dtype=bfloat16", "method.epochs=2"]
    run(compose(["experiment=ioi_mlp8_das", *low]), tmp_path / "mlp")
    run(compose(["experiment=ioi_mean_diff", *low]), tmp_path / "resid")
    overrides = [
        f"direction={tmp_path / 'mlp' / C.DIRECTION}",
        f"extra.resid_direction={tmp_path / 'resid' / C.DIRECTION}",
        "extra.random_mlp_epochs=1",
        "extra.n_random=200",
        "extra.random_mlp_seeds=2",
        "extra.n_random_directions=8",
        "extra.n_natural=3",
    ]
    df = run(compose(["experiment=illusion_check", *low, *overrides]), tmp_path / "check")
    checks = df[df.metric == "check_value"].set_index("intervention").value
    from mlpim.analysis import illusion

    assert set(checks.index) == set(illusion.CHECKS)
    measured = checks.drop("generalisation")  # NaN: bfloat16 rounds its tiny train FLDD to 0
    assert measured.notna().all(), checks
    saved = torch.load(tmp_path / "mlp" / C.DIRECTION, weights_only=True)
    assert saved["basis"].dtype == torch.float32  # directions stay float32 in a 16-bit model
    text = (tmp_path / "check" / C.VERDICT).read_text()
    null_sq = float(text.split("‖null‖² ")[1].split(";")[0])
    assert 0.1 < null_sq < 0.9  # the bug: 1.000, every direction "all nullspace"
