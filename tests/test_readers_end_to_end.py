"""Bring your own direction and task (issue 21): `mlpim check` on directions saved by pyvene,
SAELens, causalab and numpy, end to end on the tiny model; MIB-style tasks (JSONL and
save_to_disk); dataset.invalid=drop and dataset.keep=known; a file that would run code.

The command line runs in this process (`helpers.cli`). The illusion_check references are cut to a
few directions and one random MLP of one epoch: these tests check the plumbing, not a verdict.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import NAMES, PROBE, REFS, assert_one_line_error, cli, pair_rows
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mlpim import constants as C
from mlpim.config import compose
from mlpim.errors import MlpimError
from mlpim.experiments.common import predictor, warn_small_clean_ld
from mlpim.identity import file_sha256
from mlpim.run import run_experiment
from mlpim.tasks import bos_id, task_splits
from mlpim.tasks.ioi import make_pairs
from mlpim.tasks.mib import ioi_mib_rows, write_mib_jsonl
from mlpim.tasks.pairs import encode

D_MODEL, D_MLP = 64, 128  # conf/model/tiny.yaml


def unit(d: int = D_MLP, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(d).astype(np.float32)
    return v / np.linalg.norm(v)


def check(capsys, tmp_path: Path, direction: Path, *overrides: str) -> tuple[int, str, Path]:
    """`mlpim check DIRECTION` on the tiny model: (exit code, output, run directory)."""
    out = tmp_path / f"run_{direction.name}_{len(list(tmp_path.glob('run_*')))}"
    args = [str(direction), *PROBE, *REFS, *overrides, f"hydra.run.dir={out}"]
    code, text = cli(capsys, "check", *args)
    return code, text, out


def effect_and_verdict(run_dir: Path) -> tuple[float, float]:
    """(FLDD of the direction: the effect check's value, number of warnings) of a run."""
    df = pd.read_csv(run_dir / C.METRICS)
    effect = df[(df.intervention == "effect") & (df.metric == "check_value")].value.item()
    return effect, df[df.metric == "n_warnings"].value.item()


def assert_checked(code: int, text: str, run_dir: Path, describe: str) -> None:
    """The run finished: verdict table printed, the report named, the reader's INFO line."""
    assert code == 0, text
    assert "verdict" in text and f"report: {run_dir / C.VERDICT}" in text, text
    assert (run_dir / C.VERDICT).is_file() and (run_dir / C.DONE).is_file()
    assert describe in (run_dir / C.LOG).read_text()


# ---------------------------------------------------------------- pyvene


def hf_gpt2():
    """A HF GPT-2 with the tiny model's widths, for pyvene to train on (its weights do not
    matter: the folder holds only the rotation)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(n_layer=3, n_embd=D_MODEL, n_head=4, n_inner=D_MLP, vocab_size=50)
    return GPT2LMHeadModel(conf).eval()


def pyvene_folder(path: Path, component: str, k: int = 1, steps: int = 3):
    """A LowRankRotatedSpaceIntervention at `component` (layer 1) trained a few steps with
    pyvene, saved with pyvene's own `save`; returns pyvene's rotation (d×k)."""
    pv = pytest.importorskip("pyvene")
    width = D_MLP if component.endswith("c_proj.input") or component == "mlp_activation" else None
    iv = pv.LowRankRotatedSpaceIntervention(embed_dim=width or D_MODEL, low_rank_dimension=k)
    rep = dict(layer=1, component=component, unit="pos", max_number_of_units=1, intervention=iv)
    model = pv.IntervenableModel(pv.IntervenableConfig(representations=[rep]), hf_gpt2())
    model.disable_model_gradients()
    gen = torch.Generator().manual_seed(1)
    base, source = (torch.randint(0, 50, (4, 6), generator=gen) for _ in range(2))
    opt = torch.optim.Adam(model.get_trainable_parameters(), lr=0.05)
    for _ in range(steps):
        _, out = model({"input_ids": base}, [{"input_ids": source}], {"sources->base": 5})
        out.logits[:, -1, 7].mean().backward()
        opt.step()
        opt.zero_grad()
    model.save(str(path))
    return iv.rotate_layer.weight.detach().clone()


def test_check_a_pyvene_folder_equals_the_same_vector_as_npy(tmp_path, capsys):
    """The pyvene folder (mlp_post through GPT-2's c_proj input) and pyvene's own rotation saved
    as .npy give the same FLDD and verdict."""
    rotation = pyvene_folder(tmp_path / "pv", "transformer.h[1].mlp.c_proj.input")
    np.save(tmp_path / "same.npy", rotation[:, 0].numpy())
    code, text, pv_run = check(capsys, tmp_path, tmp_path / "pv")
    describe = "pyvene LowRankRotatedSpaceIntervention at transformer.h[1].mlp.c_proj.input"
    assert_checked(code, text, pv_run, describe + " → mlp_post L1, width 128, k=1")
    site = ["direction_site=mlp_post", "direction_layer=1"]
    code, text, npy_run = check(capsys, tmp_path, tmp_path / "same.npy", *site)
    assert_checked(code, text, npy_run, "npy tensor → mlp_post L1")
    (fldd_pv, n_pv), (fldd_npy, n_npy) = effect_and_verdict(pv_run), effect_and_verdict(npy_run)
    assert abs(fldd_pv - fldd_npy) < 1e-4 and n_pv == n_npy


def test_check_a_rank_3_pyvene_folder_whole_equals_its_rotation_as_npy(tmp_path, capsys):
    """A LowRankRotatedSpaceIntervention of rank 3 at mlp_post is checked whole (issue 31), with
    the numbers of pyvene's own rotation saved as a 3-column .npy."""
    rotation = pyvene_folder(tmp_path / "pv", "transformer.h[1].mlp.c_proj.input", k=3)
    np.save(tmp_path / "same.npy", rotation.numpy())
    code, text, pv_run = check(capsys, tmp_path, tmp_path / "pv")
    assert_checked(code, text, pv_run, "→ mlp_post L1, width 128, k=3")
    site = ["direction_site=mlp_post", "direction_layer=1"]
    code, text, npy_run = check(capsys, tmp_path, tmp_path / "same.npy", *site)
    assert_checked(code, text, npy_run, "npy tensor → mlp_post L1, width 128, k=3")
    pv, npy = (pd.read_csv(r / C.METRICS) for r in (pv_run, npy_run))
    assert set(pv.dim) == {3} and np.allclose(pv.value, npy.value, atol=1e-4, equal_nan=True)


def test_pyvene_key_and_a_space_that_does_not_fit_the_model(tmp_path, capsys):
    """`direction_key=` names pyvene's key (its `#i` may be left out: Hydra's grammar needs it
    quoted); pyvene's mlp_activation is refused, in one line after the model loads, on a gated
    (Llama) MLP."""
    pyvene_folder(tmp_path / "pv", "block_output", steps=1)
    key = "layer_1_comp_block_output_unit_pos_nunit_1"
    code, text, out = check(capsys, tmp_path, tmp_path / "pv", f"direction_key='{key}#0'")
    assert_checked(code, text, out, "→ resid_post L1, width 64, k=1")
    code, text = cli(capsys, "check", str(tmp_path / "pv"), "direction_key=nope", *PROBE)
    assert_one_line_error(code, text, "direction_key='nope' names none of its interventions", key)
    pyvene_folder(tmp_path / "act", "mlp_activation", steps=1)
    llama = ["model.arch=llama", f"hydra.run.dir={tmp_path}/llama"]
    code, text = cli(capsys, "check", str(tmp_path / "act"), *PROBE, *REFS, *llama)
    assert_one_line_error(
        code, text, "act_fn's output before the `up` product, not mlpim's mlp_post"
    )


def pyvene_patched_logits(arch: str, component: str, basis: torch.Tensor, pb, tmp_path: Path):
    """pyvene's patched END logits of the base prompts, with `basis` in a LowRankRotated
    intervention at `component` (layer 1) of the tiny model's own HF model, unwrapped
    (`load_hf`: the bridge swaps in its own attention modules, so on the bridge's
    `original_model` pyvene's GPT-2 `attention_output` hook, on `attn.resid_dropout`, would never
    fire), saved and read back by mlpim's reader; returns (logits, the reader's record)."""
    pv = pytest.importorskip("pyvene")
    from mlpim.engine.models import load_hf
    from mlpim.engine.readers import read_direction
    from mlpim.experiments.common import model_spec
    from mlpim.tasks import task_vocabulary

    cfg = compose(["model=tiny", f"model.arch={arch}"])
    hf, _ = load_hf(model_spec(cfg), task_vocabulary(cfg.dataset))
    iv = pv.LowRankRotatedSpaceIntervention(embed_dim=basis.shape[0], low_rank_dimension=1)
    with torch.no_grad():
        iv.rotate_layer.weight = basis.clone()
    rep = dict(layer=1, component=component, unit="pos", max_number_of_units=1, intervention=iv)
    ivm = pv.IntervenableModel(pv.IntervenableConfig(representations=[rep]), hf)
    ivm.save(str(tmp_path / "pv"))
    rec = read_direction(tmp_path / "pv")

    def inputs(p):
        pos = (p.mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": p.tokens, "attention_mask": p.mask, "position_ids": pos}

    locs = [[[int(i)] for i in pb.source.pos]], [[[int(i)] for i in pb.base.pos]]
    with torch.no_grad():
        _, out = ivm(inputs(pb.base), [inputs(pb.source)], {"sources->base": locs})
    return out.logits[:, -1], rec


@pytest.mark.parametrize(
    ("arch", "component", "site"),
    [
        ("gpt2", "block_input", "resid_pre"),
        ("gpt2", "block_output", "resid_post"),
        ("gpt2", "mlp_output", "mlp_out"),
        ("gpt2", "attention_output", "attn_out"),
        ("gpt2", "transformer.h[1].mlp.c_proj.input", "mlp_post"),
        ("llama", "model.layers[1].mlp.down_proj.input", "mlp_post"),
        ("llama", "block_output", "resid_post"),
    ],
)
def test_pyvene_components_patch_the_site_they_map_to(request, tmp_path, arch, component, site):
    """Right by construction: pyvene's own patch at a component equals mlpim's patch at the site
    the reader maps it to, on the bridge's HF model (same weights)."""
    from mlpim.engine.interventions import patched_end_logits, prepare
    from mlpim.engine.patching import subspace

    model = request.getfixturevalue(f"tiny_{arch}")
    cfg = compose(["model=tiny"])
    (pb,) = make_pairs(model.tokenizer, cfg.dataset, "test", [("ABB", "BAB")], 6, seed=0)
    (prep,) = prepare(model, [pb], site, 1, "full")
    diff = (prep.source_act - prep.base_act).mean(0)  # the direction that moves most
    basis = (diff / diff.norm())[:, None]
    theirs, rec = pyvene_patched_logits(arch, component, basis, pb, tmp_path)
    assert (rec.site, rec.layer) == (site, 1)
    assert torch.allclose(rec.basis @ rec.basis.T, basis @ basis.T, atol=1e-6)
    ours = patched_end_logits(model, prep, subspace(rec.basis))
    effect = (ours - prep.clean_logits).abs().max().item()
    gap = (ours - theirs).abs().max().item()
    assert effect > 1e-3  # the patch does something, so agreement means something
    assert gap < 1e-6 + effect / 100


# ---------------------------------------------------------------- SAELens, causalab, numpy


def saelens_folder(path: Path, hook: str, d_in: int, kwargs: dict | None) -> torch.Tensor:
    """SAELens's save_model layout (cfg.json + sae_weights.safetensors); returns W_dec."""
    path.mkdir(parents=True)
    w_dec = torch.randn(16, d_in, generator=torch.Generator().manual_seed(3))
    weights = {
        "W_enc": w_dec.T.contiguous(),
        "W_dec": w_dec,
        "b_enc": torch.zeros(16),
        "b_dec": torch.zeros(d_in),
    }
    save_file(weights, path / "sae_weights.safetensors")
    meta = {"model_name": "tiny", "hook_name": hook, "hook_head_index": None}
    meta |= {} if kwargs is None else {"model_from_pretrained_kwargs": kwargs}
    cfg = {"d_in": d_in, "d_sae": 16, "architecture": "standard", "metadata": meta}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w_dec


def test_check_a_saelens_feature(tmp_path, capsys):
    raw = {"center_writing_weights": False}
    saelens_folder(tmp_path / "sae", "blocks.1.mlp.hook_post", D_MLP, raw)
    code, text, out = check(capsys, tmp_path, tmp_path / "sae", "direction_feature=3")
    assert_checked(code, text, out, "saelens SAE feature 3 at blocks.1.mlp.hook_post → mlp_post L1")
    code, text = cli(capsys, "check", str(tmp_path / "sae"), *PROBE)  # which feature?
    assert_one_line_error(
        code, text, "an SAE with 16 features; choose one with direction_feature=N"
    )
    saelens_folder(tmp_path / "narrow", "blocks.1.mlp.hook_post", 32, raw)
    code, text = cli(capsys, "check", str(tmp_path / "narrow"), "direction_feature=0", *PROBE)
    assert_one_line_error(
        code, text, "width 32, but mlp_post of tiny is 128"
    )  # before the model loads
    saelens_folder(tmp_path / "unsaid", "blocks.1.hook_resid_post", D_MODEL, None)
    run_dir = f"hydra.run.dir={tmp_path}/unsaid_run"
    code, text = cli(
        capsys, "check", str(tmp_path / "unsaid"), "direction_feature=0", *PROBE, run_dir
    )
    assert_one_line_error(code, text, "does not say whether the residual stream was centred")


def test_check_a_causalab_rotation_whole_or_one_column(tmp_path, capsys):
    """causalab's rotation_matrix (d, k): a k-D subspace is checked whole (issue 31); one column
    is checked with direction_columns=."""
    rotation = torch.linalg.qr(torch.randn(D_MLP, 2, generator=torch.Generator().manual_seed(2)))[0]
    (tmp_path / "cl").mkdir()
    ratio = torch.tensor([0.6, 0.3])
    save_file(
        {"rotation_matrix": rotation.contiguous(), "explained_variance_ratio": ratio},
        tmp_path / "cl" / "rotation.safetensors",
    )
    site = ["direction_site=mlp_post", "direction_layer=1"]
    path = tmp_path / "cl" / "rotation.safetensors"
    code, text, whole = check(capsys, tmp_path, path, *site)
    assert_checked(code, text, whole, "causalab tensor 'rotation_matrix' → mlp_post L1")
    assert "a 2-dim subspace checked whole" in (whole / C.VERDICT).read_text()
    assert set(pd.read_csv(whole / C.METRICS).dim) == {2}
    code, text, out = check(capsys, tmp_path, tmp_path / "cl", *site, "direction_columns=1")
    assert_checked(code, text, out, "causalab tensor 'rotation_matrix' → mlp_post L1")
    np.save(tmp_path / "col1.npy", rotation[:, 1].numpy())
    code, text, again = check(capsys, tmp_path, tmp_path / "col1.npy", *site)
    assert abs(effect_and_verdict(out)[0] - effect_and_verdict(again)[0]) < 1e-5


def test_an_mlpim_subspace_whole_or_one_column(tmp_path, capsys):
    """mlpim's own k-D subspace.pt: checked whole, or one column; a subspace larger than the
    check takes is refused in one line naming direction_columns=."""
    from mlpim.engine.direction import load_direction
    from mlpim.engine.subspace import save_subspace

    basis = torch.linalg.qr(torch.randn(D_MLP, 3, generator=torch.Generator().manual_seed(5)))[0]
    save_subspace(tmp_path / "s.pt", basis, model="tiny", site="mlp_post", layer=1, k=3)
    assert torch.equal(load_direction(tmp_path / "s.pt").basis, basis)
    col = load_direction(tmp_path / "s.pt", {"columns": [2]})
    assert torch.equal(col.basis, basis[:, 2:]) and col.describe().endswith("k=1")
    with pytest.raises(MlpimError) as e:
        load_direction(tmp_path / "s.pt", max_k=2, experiment="illusion_check")
    assert "holds a 3-D subspace" in str(e.value) and "at most 2 dimensions" in str(e.value)
    assert "direction_columns=[...] (0..2)" in str(e.value) and "\n" not in str(e.value)
    code, text, out = check(capsys, tmp_path, tmp_path / "s.pt", "direction_columns=2")
    assert_checked(code, text, out, "mlpim subspace → mlp_post L1, width 128, k=1")


def test_check_npy_and_safetensors_with_a_key(tmp_path, capsys):
    np.save(tmp_path / "v.npy", unit())
    site = ["direction_site=mlp_post", "direction_layer=1"]
    code, text, out = check(capsys, tmp_path, tmp_path / "v.npy", *site)
    assert_checked(code, text, out, "npy tensor → mlp_post L1, width 128, k=1")
    save_file({"v": torch.from_numpy(unit()), "w": torch.ones(4)}, tmp_path / "d.safetensors")
    code, text = cli(capsys, "check", str(tmp_path / "d.safetensors"), *site, *PROBE)
    assert_one_line_error(code, text, "holds 2 tensors; choose one with direction_key=")
    code, text, keyed = check(
        capsys, tmp_path, tmp_path / "d.safetensors", *site, "direction_key=v"
    )
    assert_checked(code, text, keyed, "safetensors tensor 'v' → mlp_post L1")
    assert abs(effect_and_verdict(out)[0] - effect_and_verdict(keyed)[0]) < 1e-5


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["direction_key=a"], "direction_key not for it"),  # a .npy has one array
        (["direction_site=resid_post", "direction_layer=1"], "width 128, but resid_post"),
        (["direction_site=z", "direction_layer=1"], "per head"),
        (["direction_site=mlp_post", "direction_layer=7"], "layer 7 is outside tiny"),
        (["direction_site=mlp_post"], "does not say the site and layer it was found at"),
    ],
)
def test_options_and_sites_refused_before_the_model(tmp_path, capsys, args, words):
    np.save(tmp_path / "v.npy", unit())
    code, text = cli(
        capsys, "check", str(tmp_path / "v.npy"), *args, *PROBE, f"hydra.run.dir={tmp_path}/r"
    )
    assert_one_line_error(code, text, words)
    assert not (tmp_path / "r").exists()


def test_check_command_line(tmp_path, capsys):
    code, text = cli(capsys, "check", "--help")
    assert code == 0
    for example in (
        "subspace.pt",
        "v.npy",
        "my_pyvene_dir",
        "direction_key=",
        "my_sae_dir",
        "direction_feature=",
        "rotation.safetensors",
        "dataset=mib",
        "-m",
    ):
        assert example in text, example
    code, text = cli(capsys, "check", "model=tiny")
    assert_one_line_error(code, text, "needs the direction first")
    code, text = cli(capsys, "check", str(tmp_path), "direction=x")
    assert_one_line_error(code, text, "sets experiment and direction itself")
    code, text = cli(capsys, "run", "experiment=ioi_mlp8_das", "direction_feature=3", *PROBE)
    assert_one_line_error(code, text, "direction_feature given without direction=")


# ---------------------------------------------------------------- files that would run code


class Trap:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_check_refuses_files_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    pyvene_folder(tmp_path / "pv", "block_output", steps=1)
    intkey = next((tmp_path / "pv").glob("intkey_*.bin"))
    torch.save({"rotate_layer.parametrizations.weight.original": Trap(marker)}, intkey)
    torch.save(Trap(marker), tmp_path / "t.pt")
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(Trap(marker)))
    np.save(tmp_path / "t.npy", np.array([Trap(marker)], dtype=object), allow_pickle=True)
    for path in (tmp_path / "pv", tmp_path / "t.pt", tmp_path / "t.pkl", tmp_path / "t.npy"):
        run_dir = tmp_path / f"run_{path.name}"
        code, text = cli(capsys, "check", str(path), *PROBE, f"hydra.run.dir={run_dir}")
        assert_one_line_error(code, text, f"direction={path}")
        assert not marker.exists(), f"code ran while reading {path}"
        assert not run_dir.exists()


# ---------------------------------------------------------------- MIB-style tasks


@pytest.fixture(scope="module")
def mib_files(tmp_path_factory) -> dict[str, Path]:
    """mlpim's own IOI S2-flip pairs (tiny word tokenizer) as MIB rows: JSONL, save_to_disk."""
    datasets = pytest.importorskip("datasets")
    out = tmp_path_factory.mktemp("mib")
    cfg = compose(["model=tiny"])
    tok = cfg_tokenizer(cfg)
    batches = make_pairs(tok, cfg.dataset, "test", [("ABB", "ABA"), ("BAB", "BAA")], 12, seed=0)
    rows = ioi_mib_rows(batches, tok)
    write_mib_jsonl(rows, out / "ioi_mib.jsonl")
    datasets.Dataset.from_list(rows).save_to_disk(str(out / "ioi_mib"))
    return {"jsonl": out / "ioi_mib.jsonl", "disk": out / "ioi_mib"}


def cfg_tokenizer(cfg):
    from mlpim.engine.tiny import word_tokenizer
    from mlpim.tasks import task_vocabulary

    return word_tokenizer(task_vocabulary(cfg.dataset))


MIB = ["dataset=mib", "dataset.counterfactual=s2_io_flip", "dataset.min_pairs=4"]


def test_mib_jsonl_and_save_to_disk_run_alike(mib_files):
    """The same rows as JSONL and as a save_to_disk folder give the same DAS run."""
    metrics = []
    for path in mib_files.values():
        cfg = compose(["experiment=ioi_mlp8_das", *PROBE, *MIB, f"dataset.path={path}"])
        metrics.append(run_experiment(cfg).metrics)
    cols = ["split", "intervention", "metric"]
    a, b = (m.set_index(cols).value.sort_index() for m in metrics)
    assert len(a) > 0 and (a - b).abs().max() < 1e-6


def test_check_on_a_mib_task(mib_files, tmp_path, capsys):
    np.save(tmp_path / "v.npy", unit())
    site = ["direction_site=mlp_post", "direction_layer=1"]
    task = [*MIB, f"dataset.path={mib_files['jsonl']}"]
    code, text, out = check(capsys, tmp_path, tmp_path / "v.npy", *site, *task)
    assert_checked(code, text, out, "npy tensor → mlp_post L1")
    code, text = cli(
        capsys,
        "check",
        str(tmp_path / "v.npy"),
        *site,
        *PROBE,
        "dataset=mib",
        f"dataset.path={mib_files['jsonl']}",
        "dataset.counterfactual=abc",
    )
    assert_one_line_error(
        code, text, "counterfactual 'abc' is not in the rows; available: s2_io_flip"
    )


# ---------------------------------------------------------------- invalid=drop, keep=known


def bad_task(path: Path, good: list[dict]) -> None:
    """`good` pairs, then: 2 with an answer the tokenizer cannot score, 1 malformed record, 1 not
    JSON, 1 duplicate of the first, 1 with identical answers."""
    bad = [
        {**good[0], "base_answer": "Zanzibar"},
        {**good[1], "source_answer": "Qwerty"},
        {"base": "x", "source": "y"},
    ]
    lines = [json.dumps(r) for r in good + bad] + ["{not json"]
    lines += [json.dumps(good[0]), json.dumps({**good[2], "source_answer": good[2]["base_answer"]})]
    path.write_text("\n".join(lines) + "\n")


def pairs_dataset(path: Path, **changes):
    cfg = compose(["model=tiny", "dataset=pairs", f"dataset.path={path}", "dataset.min_pairs=1"])
    return OmegaConf.merge(cfg.dataset, changes)


def test_invalid_drop_drops_exactly_the_invalid_pairs(tmp_path, caplog):
    good = pair_rows()
    bad_task(tmp_path / "t.jsonl", good)
    tok = cfg_tokenizer(compose(["model=tiny"]))
    with pytest.raises(MlpimError) as e:  # the default: every problem, one line each
        task_splits(tok, pairs_dataset(tmp_path / "t.jsonl"), 0)
    assert all(f"line {n}:" in str(e.value) for n in range(25, 31))  # 6 bad lines, all named
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        splits = task_splits(tok, pairs_dataset(tmp_path / "t.jsonl", invalid="drop"), 0)
    warnings = [r.getMessage() for r in caplog.records if "dataset.invalid=drop" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"dropped 6 of {len(good) + 6} pair(s)" in warnings[0]
    for reason in (
        "2 answer not one token",
        "1 malformed record",
        "1 not JSON",
        "1 duplicate",
        "1 identical answers",
    ):
        assert reason in warnings[0], reason
    kept = sum(len(b) for bs in splits.values() for b in bs)
    assert kept == len(good)  # the valid ones, all of them (grouped: no pair straddles)


def test_invalid_drop_counts_mib_rows_that_cannot_be_paired(mib_files, tmp_path, caplog):
    rows = [json.loads(line) for line in mib_files["jsonl"].read_text().splitlines()]
    del rows[0]["s2_io_flip_counterfactual"]
    rows[1]["s2_io_flip_counterfactual"]["choices"] = ["Zanzibar", "Mary"]
    write_mib_jsonl(rows, tmp_path / "bad.jsonl")
    tok = cfg_tokenizer(compose(["model=tiny"]))
    dataset = compose(["model=tiny", *MIB, f"dataset.path={tmp_path / 'bad.jsonl'}"]).dataset
    with pytest.raises(MlpimError) as e:
        task_splits(tok, dataset, 0)
    assert "row 0: cannot be paired: no s2_io_flip_counterfactual" in str(e.value)
    with caplog.at_level(logging.WARNING):
        task_splits(tok, OmegaConf.merge(dataset, {"invalid": "drop"}), 0)
    (warning,) = [r.getMessage() for r in caplog.records if "invalid=drop" in r.getMessage()]
    assert f"dropped 2 of {len(rows)} pair(s)" in warning
    assert "1 no s2_io_flip_counterfactual" in warning and "1 answer not one token" in warning


def test_keep_known_keeps_the_pairs_the_model_predicts(tiny_gpt2, tmp_path, caplog):
    """Pairs built from the tiny model's own argmax (on random word strings: it answers "to" to
    every IOI prompt): those whose two answers it predicts are kept, counted per group."""
    import random

    tok, predict = tiny_gpt2.tokenizer, predictor(tiny_gpt2)
    rng, words = random.Random(0), [*NAMES, "store", "drink", "gave", "went", "the", "and"]
    prompts = [" ".join(rng.choices(words, k=rng.randint(2, 6))) for _ in range(40)]
    predicted = [tok.decode([i]).strip() for i in predict(prompts)]
    rows, n_known = [], 0
    for i in range(0, len(prompts), 2):
        (b, s), (wb, ws) = prompts[i : i + 2], predicted[i : i + 2]
        if wb == ws or b == s:
            continue
        known = len(rows) % 2 == 0
        wrong = next(w for w in NAMES if w not in (wb, ws))
        n_known += known
        row = {"base": b, "source": s, "base_answer": wb if known else wrong, "source_answer": ws}
        rows.append(row | {"meta": {"relation": "even" if known else "odd", "group": i}})
    assert n_known >= 3 and len(rows) - n_known >= 3
    encode([*map(_pair, rows)], tok, bos_id(tok))  # every pair valid: only `known` tells
    (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    dataset = pairs_dataset(tmp_path / "t.jsonl", keep="known")
    with caplog.at_level(logging.INFO):
        splits = task_splits(tok, dataset, 0, predict)
    assert sum(len(b) for bs in splits.values() for b in bs) == n_known
    (line,) = [r.getMessage() for r in caplog.records if "keep=known kept" in r.getMessage()]
    odd = len(rows) - n_known
    assert f"kept {n_known} of {len(rows)}" in line and f"odd 0/{odd}" in line
    assert f"even {n_known}/{n_known}" in line


def _pair(row: dict):
    from mlpim.tasks.pairs import Pair

    return Pair(**row)


def test_small_clean_logit_difference_warns_once(caplog):
    """One WARNING when the pairs' mean clean LD is below 1 nat (FLDD's denominator)."""
    small = {"train": [SimpleNamespace(clean_ld=torch.tensor([0.2, 0.4]))]}
    large = {"train": [SimpleNamespace(clean_ld=torch.tensor([2.0, 3.0]))]}
    with caplog.at_level(logging.WARNING):
        warn_small_clean_ld(large, "known")
        assert not caplog.records
        warn_small_clean_ld(small, "all")
    (record,) = caplog.records
    assert "mean clean logit difference of 0.3 nat" in record.getMessage()
    assert "dataset.keep=known" in record.getMessage() and "\n" not in record.getMessage()


def test_keep_and_invalid_only_for_file_tasks(capsys):
    code, text = cli(capsys, "run", "experiment=ioi_mlp8_das", *PROBE, "dataset.keep=known")
    assert_one_line_error(code, text, "dataset.keep=known applies to the pairs of a user's file")
    code, text = cli(capsys, "run", "experiment=ioi_mlp8_das", *PROBE, "dataset.invalid=skip")
    assert_one_line_error(code, text, "dataset.invalid=skip: allowed: error, drop")


def test_a_folder_direction_is_hashed_by_content(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"1")
    first = file_sha256(tmp_path / "d")
    (tmp_path / "d" / "a.bin").write_bytes(b"2")
    assert first is not None and file_sha256(tmp_path / "d") != first


def test_each_direction_file_is_read_once_per_run(tmp_path, capsys, monkeypatch):
    """`mlpim check` reads `direction=` and `extra.resid_direction=` once each: preflight loads
    them into `Direction`s and the runner receives those (no second read, no second sniff)."""
    from mlpim.engine import direction as D
    from mlpim.engine.subspace import save_subspace

    reads, loads = [], []

    def counted(load):
        def read(file, *args, **kwargs):
            reads.append(Path(file).name)
            return load(file, *args, **kwargs)

        return read

    def load_direction(path, *args, **kwargs):
        loads.append(Path(path).name)
        return real(path, *args, **kwargs)

    real = D.load_direction
    monkeypatch.setattr(np, "load", counted(np.load))
    monkeypatch.setattr(torch, "load", counted(torch.load))
    monkeypatch.setattr(D, "load_direction", load_direction)
    monkeypatch.setattr("mlpim.preflight.load_direction", load_direction)
    np.save(tmp_path / "v.npy", unit())
    resid = torch.from_numpy(unit(D_MODEL, seed=1))[:, None]
    save_subspace(tmp_path / "r.pt", resid, site="resid_post", layer=1)
    site = ["direction_site=mlp_post", "direction_layer=1"]
    code, text, out = check(
        capsys, tmp_path, tmp_path / "v.npy", *site, f"extra.resid_direction={tmp_path / 'r.pt'}"
    )
    assert_checked(code, text, out, "npy tensor → mlp_post L1, width 128, k=1")
    assert sorted(loads) == ["r.pt", "v.npy"], loads
    assert reads.count("v.npy") == 1 and reads.count("r.pt") == 1, reads


def test_a_square_matrix_says_which_axis_it_was_read_by(tmp_path, capsys):
    """A d×d array (vectors in rows or in columns? RAVEL's DAS and pyvene's differ by exactly
    this transpose) is read by columns, and the run's log says so and names direction_rows=."""
    square = torch.linalg.qr(torch.randn(D_MLP, D_MLP, generator=torch.Generator().manual_seed(3)))
    np.save(tmp_path / "sq.npy", square[0].numpy())
    site = ["direction_site=mlp_post", "direction_layer=1"]
    code, text, out = check(capsys, tmp_path, tmp_path / "sq.npy", *site, "direction_columns=0")
    said = "(128, 128) torch.float32 columns [0]; square, so its orientation is a guess: read as "
    assert_checked(
        code, text, out, said + "vectors in columns (direction_rows= reads vectors in rows)"
    )
