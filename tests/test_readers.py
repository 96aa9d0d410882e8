"""Directions saved by other tools: pyvene folders, SAELens folders, causalab, plain tensors.

The pyvene tests train a real pyvene 0.1.8 intervention on a tiny GPT-2 and save it with pyvene's
own `save`; they are skipped when pyvene is not installed.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlpim.engine.direction import load_direction
from mlpim.engine.patching import subspace_patch
from mlpim.engine.readers import (
    KINDS,
    ForeignDirection,
    ModelSizes,
    check_fits,
    file_kind,
    read_direction,
    sizes_of,
    sniff,
    tl_hook_site,
)
from mlpim.engine.subspace import save_subspace
from mlpim.errors import MlpimError

D, D_MLP = 32, 128
GPT2_SIZES = ModelSizes(
    n_layers=2, d_model=D, d_mlp=D_MLP, n_heads=4, d_head=8, gated_mlp=False, post_norm=False
)


def one_line(excinfo) -> str:
    """The refusal's message, checked to be one line."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- pyvene


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=50, n_positions=16)
    return GPT2LMHeadModel(cfg).eval()


def pyvene_folder(path: Path, model, reps: list[dict], setup=None, steps: int = 3):
    """Train `reps` (pyvene representation dicts) a few steps on `model`, save with pyvene."""
    pv = pytest.importorskip("pyvene")
    intervenable = pv.IntervenableModel(pv.IntervenableConfig(representations=reps), model)
    if setup is not None:
        setup(list(intervenable.interventions.values()))
    intervenable.disable_model_gradients()
    gen = torch.Generator().manual_seed(1)
    base, source = (torch.randint(0, 50, (4, 6), generator=gen) for _ in range(2))
    opt = torch.optim.Adam(intervenable.get_trainable_parameters(), lr=0.05)
    for _ in range(steps):
        _, out = intervenable({"input_ids": base}, [{"input_ids": source}], {"sources->base": 5})
        out.logits[:, -1, 7].mean().backward()
        opt.step()
        opt.zero_grad()
    intervenable.save(str(path))
    return intervenable


def rep(kind: str, layer: int = 1, component: str = "block_output", **extra) -> dict:
    pv = pytest.importorskip("pyvene")
    return dict(
        layer=layer,
        component=component,
        unit="pos",
        max_number_of_units=1,
        intervention_type=getattr(pv, kind),
        **extra,
    )


def loaded_rotation(path: Path, model, index: int = 0) -> torch.Tensor:
    """The rotation of pyvene's own `IntervenableModel.load` of the folder."""
    pv = pytest.importorskip("pyvene")
    loaded = pv.IntervenableModel.load(str(path), model)
    return list(loaded.interventions.values())[index].rotate_layer.weight.detach()


def test_pyvene_low_rank_equals_pyvenes_own_rotation(tmp_path, gpt2):
    live = pyvene_folder(
        tmp_path, gpt2, [rep("LowRankRotatedSpaceIntervention", low_rank_dimension=2)]
    )
    rec = read_direction(tmp_path)
    assert sniff(tmp_path) == "pyvene"
    assert (rec.site, rec.layer, rec.width, rec.k) == ("resid_post", 1, D, 2)
    intervention = list(live.interventions.values())[0]
    assert (rec.basis - intervention.rotate_layer.weight.detach()).abs().max() < 1e-6
    assert (rec.basis - loaded_rotation(tmp_path, gpt2)).abs().max() < 1e-6
    assert rec.describe() == (
        "pyvene LowRankRotatedSpaceIntervention at block_output L1 → resid_post L1, width 32, k=2"
    )
    base, source = torch.randn(3, D), torch.randn(3, D)
    with torch.no_grad():
        theirs = intervention(base, source)
    assert (theirs - subspace_patch(base, source, rec.basis)).abs().max() < 1e-5
    check_fits(rec, GPT2_SIZES)


def test_pyvene_rotated_takes_the_interchange_dims(tmp_path, gpt2):
    live = pyvene_folder(
        tmp_path,
        gpt2,
        [rep("RotatedSpaceIntervention")],
        setup=lambda ivs: ivs[0].set_interchange_dim(3),
    )
    rec = read_direction(tmp_path)
    assert rec.k == 3 and "interchange_dim=3" in rec.note
    assert (rec.basis - loaded_rotation(tmp_path, gpt2)[:, :3]).abs().max() < 1e-6
    intervention = list(live.interventions.values())[0]
    base, source = torch.randn(3, D), torch.randn(3, D)
    with torch.no_grad():
        theirs = intervention(base.clone(), source.clone())
    assert (theirs - subspace_patch(base, source, rec.basis)).abs().max() < 1e-5


def test_pyvene_boundless_takes_the_boundary(tmp_path, gpt2):
    def setup(ivs):
        ivs[0].set_intervention_boundaries(0.2)

    pyvene_folder(tmp_path, gpt2, [rep("BoundlessRotatedSpaceIntervention")], setup=setup)
    state = torch.load(next(tmp_path.glob("intkey_*.bin")), weights_only=True)
    b = float(state["intervention_boundaries"].clamp(1e-3, 1))
    rec = read_direction(tmp_path)
    assert rec.k == sum(1 for i in range(D) if i < b * D)
    assert (rec.basis - loaded_rotation(tmp_path, gpt2)[:, : rec.k]).abs().max() < 1e-6
    assert "hard limit" in rec.note and "soft mask" in rec.note


def test_pyvene_key_chooses_among_several(tmp_path, gpt2):
    reps = [
        rep("LowRankRotatedSpaceIntervention", layer=1, low_rank_dimension=2),
        rep(
            "LowRankRotatedSpaceIntervention",
            layer=0,
            component="mlp_activation",
            low_rank_dimension=1,
        ),
    ]
    pyvene_folder(tmp_path, gpt2, reps)
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path)
    assert "key=" in one_line(e) and "layer_0_comp_mlp_activation_unit_pos_nunit_1#0" in str(
        e.value
    )
    by_key = read_direction(tmp_path, key="layer_0_comp_mlp_activation_unit_pos_nunit_1")
    by_index = read_direction(tmp_path, key=1)
    assert (by_key.site, by_key.layer, by_key.width, by_key.k) == ("mlp_post", 0, D_MLP, 1)
    assert torch.equal(by_key.basis, by_index.basis)
    assert (by_key.basis - loaded_rotation(tmp_path, gpt2, 1)).abs().max() < 1e-6
    assert read_direction(tmp_path, key=0).site == "resid_post"
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path, key="layer_5_comp_block_output")
    assert "names none" in one_line(e)


def test_pyvene_mlp_activation_needs_an_ungated_mlp(tmp_path, gpt2):
    reps = [rep("LowRankRotatedSpaceIntervention", 0, "mlp_activation", low_rank_dimension=1)]
    pyvene_folder(tmp_path, gpt2, reps, steps=1)
    rec = read_direction(tmp_path)
    check_fits(rec, GPT2_SIZES)  # GPT-2: act(pre) is mlp_post
    gated = ModelSizes(**{**GPT2_SIZES.__dict__, "gated_mlp": True})
    with pytest.raises(MlpimError) as e:
        check_fits(rec, gated)
    assert "before the `up` product" in one_line(e)
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path, gated_mlp=True)
    assert "mlp_post" in one_line(e)


def _rewrite_component(folder: Path, component: str, unit: str = "pos") -> None:
    """Make a saved folder claim another component/unit (file renamed to the matching key)."""
    cfg = json.loads((folder / "config.json").read_text())
    old = cfg["sorted_keys"][0]
    cfg["representations"][0][1], cfg["representations"][0][2] = component, unit
    where = (
        f"comp_{component.replace('.', '_')}" if "." in component else f"layer_1_comp_{component}"
    )
    new = f"{where}_unit_{unit.replace('.', '_')}_nunit_1#0"  # pyvene's _get_representation_key
    cfg["sorted_keys"] = [new]
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / f"intkey_{old}.bin").rename(folder / f"intkey_{new}.bin")


@pytest.mark.parametrize(
    ("component", "unit", "words"),
    [
        ("mlp_input", "pos", "no mlpim site"),
        ("head_query_output", "h.pos", "single heads"),
        ("block_output", "h.pos", "one position"),
        ("mystery_output", "pos", "unknown"),
        ("transformer.h[1].attn.c_attn.output", "pos", "module path mlpim does not map"),
    ],
)
def test_pyvene_refuses_components_without_an_mlpim_site(tmp_path, gpt2, component, unit, words):
    pyvene_folder(
        tmp_path, gpt2, [rep("LowRankRotatedSpaceIntervention", low_rank_dimension=1)], steps=1
    )
    _rewrite_component(tmp_path, component, unit)
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path)
    assert words in one_line(e)


def test_pyvene_space_checks(tmp_path, gpt2):
    reps = [rep("LowRankRotatedSpaceIntervention", 1, "mlp_output", low_rank_dimension=1)]
    pyvene_folder(tmp_path, gpt2, reps, steps=1)
    rec = read_direction(tmp_path)
    assert rec.site == "mlp_out"
    with pytest.raises(MlpimError) as e:
        check_fits(rec, ModelSizes(**{**GPT2_SIZES.__dict__, "post_norm": True}))
    assert "post-attention/post-MLP norm" in one_line(e)
    with pytest.raises(MlpimError) as e:
        check_fits(rec, GPT2_SIZES, compat=True)
    assert "model.compat=false" in one_line(e)
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path, site="resid_post")
    assert "the file says site='mlp_out'" in one_line(e)
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path, feature=3)
    assert "feature" in one_line(e)


# ---------------------------------------------------------------- code in files never runs


class Trap:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_files_that_would_run_code_are_refused(tmp_path, gpt2):
    marker = tmp_path / "ran"
    pyvene_folder(
        tmp_path / "pv",
        gpt2,
        [rep("LowRankRotatedSpaceIntervention", low_rank_dimension=1)],
        steps=1,
    )
    intkey = next((tmp_path / "pv").glob("intkey_*.bin"))
    torch.save({"rotate_layer.parametrizations.weight.original": Trap(marker)}, intkey)
    torch.save(Trap(marker), tmp_path / "t.pt")
    with (tmp_path / "t.pkl").open("wb") as f:
        pickle.dump(Trap(marker), f)
    np.save(tmp_path / "t.npy", np.array([Trap(marker)], dtype=object), allow_pickle=True)
    for path in (tmp_path / "pv", tmp_path / "t.pt", tmp_path / "t.pkl", tmp_path / "t.npy"):
        with pytest.raises(MlpimError) as e:
            read_direction(path)
        assert str(path) in one_line(e)
        assert not marker.exists(), f"code ran while reading {path}"


# ---------------------------------------------------------------- SAELens


RAW = {"center_writing_weights": False}  # what SAELens's training runner records by default


def saelens_folder(
    path: Path, hook: str, d_in: int = D, d_sae: int = 10, v6: bool = True, kwargs=RAW
):
    """A folder in SAELens's save_model layout (`kwargs`: the recorded
    model_from_pretrained_kwargs, None: not recorded); returns its W_dec."""
    path.mkdir(parents=True, exist_ok=True)
    w_dec = torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(3))
    weights = {
        "W_enc": w_dec.T.contiguous(),
        "W_dec": w_dec,
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }
    save_file(weights, path / "sae_weights.safetensors")
    meta = {
        "model_name": "tiny",
        "hook_name": hook,
        "hook_head_index": None,
        "sae_lens_version": "6.18.0",
    }
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "architecture": "standard",
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if kwargs is not None:
        meta["model_from_pretrained_kwargs"] = kwargs
    old = {"hook_point": hook, "hook_point_layer": 1}
    old |= {} if kwargs is None else {"model_from_pretrained_kwargs": kwargs}
    cfg |= {"metadata": meta} if v6 else old
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w_dec


def test_saelens_feature_is_a_decoder_row(tmp_path):
    w_dec = saelens_folder(tmp_path, "blocks.1.hook_resid_pre")
    assert sniff(tmp_path) == "saelens"
    rec = read_direction(tmp_path, feature=3)
    assert (rec.site, rec.layer, rec.k, rec.fmt) == ("resid_pre", 1, 1, "saelens")
    assert torch.allclose(rec.basis[:, 0], w_dec[3] / w_dec[3].norm(), atol=1e-6)
    assert (
        rec.describe()
        == "saelens SAE feature 3 at blocks.1.hook_resid_pre → resid_pre L1, width 32, k=1"
    )
    check_fits(rec, GPT2_SIZES)
    two = read_direction(tmp_path, feature=[3, 5])
    assert two.k == 2 and torch.allclose(two.basis.T @ two.basis, torch.eye(2), atol=1e-6)
    residual = w_dec[5] - two.basis @ (two.basis.T @ w_dec[5])
    assert residual.norm() < 1e-5 * w_dec[5].norm()


@pytest.mark.parametrize(
    ("hook", "site", "layer", "width"),
    [
        ("blocks.0.hook_mlp_out", "mlp_out", 0, D),
        ("blocks.1.mlp.hook_post", "mlp_post", 1, D_MLP),
        ("blocks.1.attn.hook_z", "z", 1, D),
        ("blocks.0.hook_out", "resid_post", 0, D),
        ("blocks.1.hook_attn_out", "attn_out", 1, D),
    ],
)
def test_saelens_site_comes_from_the_hook_name(tmp_path, hook, site, layer, width):
    saelens_folder(tmp_path, hook, d_in=width, v6=False)
    rec = read_direction(tmp_path, feature=0)
    assert (rec.site, rec.layer, rec.width) == (site, layer, width)
    if site != "z":
        check_fits(rec, GPT2_SIZES)
        return
    with pytest.raises(MlpimError) as e:  # mlpim patches z per head: no whole-z vector
        check_fits(rec, GPT2_SIZES)
    assert "per head" in one_line(e)


@pytest.mark.parametrize(
    ("kwargs", "raw_ok", "compat_ok"),
    [
        ({"center_writing_weights": False}, True, False),
        ({"center_writing_weights": True}, False, True),
        ({"fold_ln": True}, False, True),  # TransformerLens's own default centres
        (None, False, False),  # not recorded: mlpim cannot tell
    ],
)
def test_saelens_residual_processing_must_match(tmp_path, kwargs, raw_ok, compat_ok):
    """A residual SAE is refused on a model processed otherwise than the SAE's (compat centres
    the residual stream); an MLP-hidden SAE fits both (the centring does not touch it)."""
    saelens_folder(tmp_path / "r", "blocks.1.hook_resid_post", kwargs=kwargs)
    rec = read_direction(tmp_path / "r", feature=0)
    for compat, ok in ((False, raw_ok), (True, compat_ok)):
        if ok:
            check_fits(rec, GPT2_SIZES, compat=compat)
            continue
        with pytest.raises(MlpimError) as e:
            check_fits(rec, GPT2_SIZES, compat=compat)
        assert "model.compat" in one_line(e) or "does not say whether" in str(e.value)
    saelens_folder(tmp_path / "m", "blocks.1.mlp.hook_post", d_in=D_MLP, kwargs=kwargs)
    for compat in (False, True):
        check_fits(read_direction(tmp_path / "m", feature=0), GPT2_SIZES, compat=compat)


@pytest.mark.parametrize(
    ("hook", "words"),
    [
        ("blocks.1.mlp.hook_pre", "pre-activation"),
        ("blocks.1.ln2.hook_normalized", "layer-normed"),
        ("hook_embed", "not a blocks"),
        ("blocks.1.hook_mlp_post", "unknown hook"),
    ],
)
def test_saelens_refuses_hooks_without_an_mlpim_site(tmp_path, hook, words):
    saelens_folder(tmp_path, hook)
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path, feature=0)
    assert words in one_line(e)


def test_saelens_refusals(tmp_path):
    saelens_folder(tmp_path, "blocks.1.hook_resid_post")
    for options, words in [({}, "feature=N"), ({"feature": 10}, "0..9"), ({"key": "W_dec"}, "key")]:
        with pytest.raises(MlpimError) as e:
            read_direction(tmp_path, **options)
        assert words in one_line(e)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"d_in": D + 1}))
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path, feature=0)
    assert "W_dec is [10, 32]" in one_line(e)
    cfg["metadata"]["hook_head_index"] = 2
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path, feature=0)
    assert "head 2" in one_line(e)
    saelens_folder(tmp_path / "wide", "blocks.1.hook_resid_post", d_in=D + 4)
    with pytest.raises(MlpimError) as e:
        check_fits(read_direction(tmp_path / "wide", feature=1), GPT2_SIZES)
    assert "width 36" in one_line(e)


def test_tl_hook_site_names():
    assert tl_hook_site("blocks.12.hook_resid_post", "x") == ("resid_post", 12)
    assert tl_hook_site(" blocks.3.attn.hook_out ", "x") == ("attn_out", 3)


# ---------------------------------------------------------------- causalab and plain tensors


def test_causalab_rotation(tmp_path):
    rotation = torch.linalg.qr(torch.randn(D, 3, generator=torch.Generator().manual_seed(4)))[0]
    folder = tmp_path / "L1_last"
    folder.mkdir()
    save_file(
        {"rotation_matrix": rotation.contiguous(), "explained_variance_ratio": torch.ones(3)},
        folder / "rotation.safetensors",
    )
    assert sniff(folder) == sniff(folder / "rotation.safetensors") == "causalab"
    rec = read_direction(folder, site="resid_post", layer=1)
    assert (rec.fmt, rec.k, rec.site, rec.layer) == ("causalab", 3, "resid_post", 1)
    assert torch.equal(rec.basis, rotation)
    assert torch.equal(read_direction(folder, columns=[0]).basis, rotation[:, :1])
    check_fits(rec, GPT2_SIZES)
    with pytest.raises(MlpimError) as e:
        check_fits(read_direction(folder), GPT2_SIZES)
    assert "give both" in one_line(e)
    with pytest.raises(MlpimError) as e:
        check_fits(rec, ModelSizes(**{**GPT2_SIZES.__dict__, "d_model": 64, "d_head": 16}))
    assert "width 32, but resid_post" in one_line(e)
    with pytest.raises(MlpimError) as e:
        check_fits(read_direction(folder, site="mlp_post", layer=0), GPT2_SIZES)
    assert "mlp_post of the model is 128" in one_line(e)
    not_orthonormal = {"rotation_matrix": (2 * rotation).contiguous()}
    save_file(not_orthonormal, tmp_path / "bad.safetensors")
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path / "bad.safetensors")
    assert "not orthonormal" in one_line(e)


def test_npy_vector_and_its_checks(tmp_path):
    v = np.random.default_rng(0).normal(size=D)
    np.save(tmp_path / "v.npy", v)
    (tmp_path / "v.npy").rename(tmp_path / "v.pt")  # the name does not matter, the contents do
    assert sniff(tmp_path / "v.pt") == "npy"
    rec = read_direction(tmp_path / "v.pt", site="resid_pre", layer=0)
    assert rec.k == 1 and torch.allclose(
        rec.basis[:, 0].double(), torch.tensor(v / np.linalg.norm(v)), atol=1e-6
    )
    check_fits(rec, GPT2_SIZES)
    for site, layer, words in [
        ("mlp_post", 0, "is 128"),
        ("resid_pre", 2, "layers 0..1"),
        ("embed", 0, "unknown site"),
    ]:
        with pytest.raises(MlpimError) as e:
            check_fits(read_direction(tmp_path / "v.pt", site=site, layer=layer), GPT2_SIZES)
        assert words in one_line(e)
    np.save(tmp_path / "zero.npy", np.zeros((D, 2)))
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path / "zero.npy")
    assert "points nowhere" in one_line(e)  # issue 18's checks, for every format
    v = np.random.default_rng(0).standard_normal(D)
    np.save(tmp_path / "parallel.npy", np.stack([v, 2 * v], 1))
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path / "parallel.npy")
    assert "rank-deficient basis" in one_line(e)


def test_keys_rows_and_columns(tmp_path):
    m = torch.randn(5, D, generator=torch.Generator().manual_seed(5))
    save_file({"a": m, "b": torch.randn(D)}, tmp_path / "two.safetensors")
    np.savez(tmp_path / "two.npz", a=m.numpy(), b=np.ones(D))
    torch.save({"a": m, "b": torch.randn(D), "step": 7}, tmp_path / "two.pt")
    for name, fmt in [("two.safetensors", "safetensors"), ("two.npz", "npz"), ("two.pt", "torch")]:
        assert sniff(tmp_path / name) == fmt
        with pytest.raises(MlpimError) as e:
            read_direction(tmp_path / name)
        assert "choose one with direction_key=" in one_line(e) and "'a'" in str(e.value)
        rec = read_direction(tmp_path / name, key="a", rows=[2])
        assert torch.allclose(rec.basis[:, 0], m[2] / m[2].norm(), atol=1e-6)
        with pytest.raises(MlpimError) as e:
            read_direction(tmp_path / name, key="a", columns=[0], rows=[0])
        assert "not both" in one_line(e)
    with pytest.raises(MlpimError) as e:  # 5 vectors of width 32, stored in rows
        read_direction(tmp_path / "two.pt", key="a")
    assert "rows=" in one_line(e)
    wrong = read_direction(tmp_path / "two.pt", key="a", columns=[0, 1], site="resid_pre", layer=0)
    with pytest.raises(MlpimError) as e:  # two columns of a 5×32 matrix are 5 wide
        check_fits(wrong, GPT2_SIZES)
    assert "width 5" in one_line(e)


def test_mlpim_subspace_file(tmp_path):
    basis = torch.linalg.qr(torch.randn(D, 2, generator=torch.Generator().manual_seed(6)))[0]
    save_subspace(tmp_path / "subspace.pt", basis, site="mlp_out", layer=1, model="tiny", k=2)
    assert sniff(tmp_path / "subspace.pt") == "mlpim"
    rec = read_direction(tmp_path / "subspace.pt")
    assert (rec.site, rec.layer, rec.k) == ("mlp_out", 1, 2) and torch.equal(rec.basis, basis)
    with pytest.raises(MlpimError) as e:
        read_direction(tmp_path / "subspace.pt", layer=0)
    assert "layer=1" in one_line(e)


def test_sniff_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    (tmp_path / "t.json").write_text('{"basis": [1, 2]}')
    (tmp_path / "r.bin").write_bytes(bytes(range(256)))
    cases = [
        (tmp_path / "notes", "readme.txt"),
        (tmp_path / "t.json", "a text file"),
        (tmp_path / "r.bin", "unknown content"),
        (tmp_path / "missing", "no such"),
    ]
    for path, words in cases:
        with pytest.raises(MlpimError) as e:
            sniff(path)
        assert words in one_line(e)


def test_sizes_of_bridge_models(tiny_gpt2, tiny_llama):
    gpt2, llama = sizes_of(tiny_gpt2), sizes_of(tiny_llama)
    assert not gpt2.gated_mlp and llama.gated_mlp
    assert not gpt2.post_norm and not llama.post_norm
    rec = ForeignDirection(
        basis=torch.eye(llama.d_mlp)[:, :1],
        site="mlp_post",
        layer=0,
        fmt="pyvene",
        kind="x",
        requires=frozenset({"ungated_mlp"}),
    )
    with pytest.raises(MlpimError):
        check_fits(rec, llama)
    check_fits(ForeignDirection(**{**rec.__dict__, "basis": torch.eye(gpt2.d_mlp)[:, :1]}), gpt2)


# ---------------------------------------------------------------- one sniffer, one policy


def test_one_sniffer_says_what_any_file_is(tmp_path):
    """`file_kind` tells every file from its content, whatever its name; `sniff` (the format a
    reader reads) and `load_direction` (what a refusal names) both ask it."""
    v = torch.randn(D)
    np.save(tmp_path / "v.npy", v.numpy())
    np.savez(tmp_path / "a.npz", v=v.numpy())
    torch.save(v, tmp_path / "t.txt")  # a torch zip, named as text
    torch.save(v, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_subspace(tmp_path / "s.pt", v[:, None] / v.norm(), site="mlp_out", layer=1)
    save_file({"v": v}, tmp_path / "w.bin")
    save_file({"rotation_matrix": torch.eye(D)[:, :2].contiguous()}, tmp_path / "r.safetensors")
    (tmp_path / "p.pt").write_bytes(pickle.dumps([1.0, 2.0]))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(64))
    (tmp_path / "n.pt").write_text("hello\n")
    (tmp_path / "e.npy").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(bytes(range(256)))
    kinds = {
        "v.npy": ("npy", "npy"),
        "a.npz": ("npz", "npz"),
        "t.txt": ("torch", "torch"),
        "legacy.pt": ("torch", "torch"),
        "s.pt": ("torch", "mlpim"),
        "w.bin": ("safetensors", "safetensors"),
        "r.safetensors": ("causalab", "causalab"),
        "p.pt": ("pickle", None),
        "m.gguf": ("gguf", None),
        "n.pt": ("text", None),
        "e.npy": ("empty", None),
        "b.pt": ("binary", None),
    }
    for name, (kind, fmt) in kinds.items():
        assert file_kind(tmp_path / name) == kind, name
        if fmt is not None:
            assert sniff(tmp_path / name) == fmt, name
            continue
        with pytest.raises(MlpimError) as e:
            sniff(tmp_path / name)
        assert "not a direction file mlpim reads" in one_line(e)
    for name in ("m.gguf", "n.pt", "e.npy", "b.pt"):
        with pytest.raises(MlpimError) as e:
            load_direction(tmp_path / name)
        assert f"{KINDS[kinds[name][0]]}, not a torch (.pt) or numpy (.npy) file" in one_line(e)


def test_one_orthonormality_policy_for_every_format(tmp_path, caplog):
    """An orthonormal basis is used as saved, in every format; a tool's rotation that is not
    orthonormal is refused; any other basis (a tensor, mlpim's own subspace.pt) is replaced by
    the orthonormal basis of its span, said in one INFO line."""
    q = torch.linalg.qr(torch.randn(D, 2, generator=torch.Generator().manual_seed(7)))[0]
    skew = (q @ torch.tensor([[2.0, 1.0], [0.0, 1.0]])).contiguous()  # same span
    for stem, basis in (("q", q), ("skew", skew)):
        save_subspace(tmp_path / f"{stem}_s.pt", basis, site="mlp_out", layer=1)
        torch.save(basis, tmp_path / f"{stem}_t.pt")
        np.save(tmp_path / f"{stem}_t.npy", basis.numpy())
        save_file({"v": basis.contiguous()}, tmp_path / f"{stem}_t.safetensors")
    for name in ("s.pt", "t.pt", "t.npy", "t.safetensors"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mlpim"):
            assert torch.equal(load_direction(tmp_path / f"q_{name}").basis, q), name
            assert not [r for r in caplog.records if "orthonormalised" in r.getMessage()]
            basis = load_direction(tmp_path / f"skew_{name}").basis
        said = [r.getMessage() for r in caplog.records if "orthonormalised" in r.getMessage()]
        assert len(said) == 1 and f"skew_{name}" in said[0], (name, said)
        assert torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-5)
        assert torch.allclose(basis @ basis.T, q @ q.T, atol=1e-5)  # the same span
        assert torch.equal(read_direction(tmp_path / f"skew_{name}").basis, basis)
    save_file({"rotation_matrix": skew}, tmp_path / "rotation.safetensors")
    with pytest.raises(MlpimError) as e:
        load_direction(tmp_path / "rotation.safetensors")
    assert "columns are not orthonormal" in one_line(e)


def test_a_file_cut_short_is_told_truncated_or_corrupt(tmp_path):
    """A zip (torch, npz) without its directory and a safetensors file shorter than its header
    says are their own kinds, refused as truncated or corrupt by the sniffer and the loader."""
    v = torch.randn(D)
    torch.save(v, tmp_path / "t.pt")
    np.savez(tmp_path / "a.npz", v=v.numpy())
    save_file({"v": v}, tmp_path / "w.safetensors")
    (tmp_path / "h.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:40])
    for name in ("t.pt", "a.npz", "w.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    kinds = {"t.pt": "corrupt_zip", "a.npz": "corrupt_zip"}
    kinds |= {"w.safetensors": "corrupt_safetensors", "h.safetensors": "corrupt_safetensors"}
    for name, kind in kinds.items():
        assert file_kind(tmp_path / name) == kind, name
        for read in (sniff, load_direction):
            with pytest.raises(MlpimError) as e:
                read(tmp_path / name)
            assert f"{tmp_path / name}: {KINDS[kind]}" in one_line(e), name
            assert "truncated or corrupt" in one_line(e)


def test_only_a_square_matrix_read_by_columns_says_its_orientation_is_a_guess(tmp_path):
    q = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(4)))[0]
    np.save(tmp_path / "sq.npy", q.numpy())
    np.save(tmp_path / "tall.npy", q[:, :3].numpy())
    guess = "square, so its orientation is a guess: read as vectors in columns (direction_rows="
    assert guess in load_direction(tmp_path / "sq.npy", {"columns": [1]}).note
    assert guess in load_direction(tmp_path / "sq.npy").note
    assert "guess" not in load_direction(tmp_path / "sq.npy", {"rows": 1}).note
    assert "guess" not in load_direction(tmp_path / "tall.npy").note
