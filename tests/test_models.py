"""Any local model (a tiny Gemma 3 saved like a download) end to end, and directions tied to
the model they were found on: fingerprints, processing flags, plain tensor files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpim import constants as C
from mlpim.config import compose
from mlpim.engine.direction import load_direction
from mlpim.engine.models import fingerprint
from mlpim.engine.subspace import direction_meta, save_subspace
from mlpim.engine.tiny import save_tiny, word_tokenizer
from mlpim.errors import ConfigError
from mlpim.experiments.common import model_spec
from mlpim.run import run
from mlpim.tasks.tokenizer import ioi_vocabulary


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    tok = word_tokenizer(ioi_vocabulary(compose(["model=tiny"]).dataset))
    return save_tiny("gemma3", tok, tmp_path_factory.mktemp("gemma3"))


def test_hf_model_directory_runs_end_to_end(gemma_dir, tmp_path):
    """`model=hf model.path=<tiny Gemma 3> site.layer=1`: the cache engine, a saved direction
    that records the model, its weights and the site."""
    cfg = compose(
        [
            "experiment=ioi_mlp8_das",
            "model=hf",
            f"model.path={gemma_dir}",
            "site.layer=1",
            "method.epochs=1",
            "device=cpu",
            "dataset.n_train_pairs=40",
            "dataset.n_test_pairs=20",
        ]
    )
    df = run(cfg, tmp_path / "run")
    assert {"clean", "full", "das"} <= set(df.intervention)
    saved = torch.load(tmp_path / "run" / C.DIRECTION, weights_only=True)
    assert saved["model"] == gemma_dir.name and saved["site"] == "mlp_post" and saved["layer"] == 1
    assert len(saved["fingerprint"]) == 16 and saved["processing"]["compat"] is False
    assert saved["width"] == saved["basis"].shape[0]


def test_hf_model_without_landmarks_names_site_layer(gemma_dir, tmp_path):
    cfg = compose(["experiment=ioi_mlp8_das", "model=hf", f"model.path={gemma_dir}", "device=cpu"])
    with pytest.raises(ConfigError, match="site.layer="):
        run(cfg, tmp_path / "run")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_building_a_tiny_model_leaves_the_global_rng_alone(arch):
    """Neither the seeded tiny weights nor TransformerLens's bridge move the caller's RNG; the
    weights are those of the seed, whatever the caller's RNG state."""
    from mlpim.experiments.common import model_for

    cfg = compose(["model=tiny", f"model.arch={arch}", "device=cpu"])
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = model_for(cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(99)
    assert fingerprint(model_for(cfg)) == fingerprint(first)


def test_direction_from_another_model_is_refused(tiny_gpt2, tiny_llama, tmp_path):
    cfg = compose(["model=tiny"])
    path = tmp_path / "v.pt"
    basis = torch.linalg.qr(torch.randn(tiny_gpt2.cfg.d_mlp, 1))[0]
    save_subspace(path, basis, **direction_meta(tiny_gpt2, model_spec(cfg), "mlp_post", 1))
    d = tiny_gpt2.cfg.d_mlp
    direction = load_direction(path)
    assert torch.equal(direction.fitted(tiny_gpt2, "mlp_post", 1), basis)
    assert direction.width == d and fingerprint(tiny_gpt2) != fingerprint(tiny_llama)
    with pytest.raises(ConfigError, match="weights"):
        direction.check_weights(tiny_llama)
    with pytest.raises(ConfigError, match="not mlp_post layer 2"):
        direction.fitted(tiny_gpt2, "mlp_post", 2)


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_plain_tensor_direction(tmp_path, suffix):
    v = torch.randn(32)
    path = tmp_path / f"v{suffix}"
    np.save(path, v.numpy()) if suffix == ".npy" else torch.save(v, path)
    saved = load_direction(path, site="resid_post", layer=3)
    assert (saved.site, saved.layer) == ("resid_post", 3)
    assert torch.allclose(saved.basis[:, 0].abs(), (v / v.norm()).abs(), atol=1e-6)


def test_direction_file_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"basis": torch.eye(3)[:, :1], "x": Evil()}, path)
    with pytest.raises(ConfigError, match="cannot load as tensors.*never runs code"):
        load_direction(path)


def test_a_second_process_dequantizing_at_once_keeps_the_first_copy(tmp_path):
    """Two processes that dequantize one GGUF at once (a joblib sweep's first run, pytest-xdist)
    each write their own folder; the later rename keeps the copy already in place and drops its
    own, and a folder that is not a finished copy still raises."""
    from mlpim.engine.models import _settle

    cache, mine = tmp_path / "m", tmp_path / "m.tmp2"
    (cache / "sub").mkdir(parents=True)
    (cache / "config.json").write_text("{}")
    mine.mkdir()
    (mine / "config.json").write_text('{"ours": 1}')
    _settle(mine, cache)
    assert (cache / "config.json").read_text() == "{}" and not mine.exists()
    (cache / "config.json").unlink()
    mine.mkdir()
    with pytest.raises(OSError):
        _settle(mine, cache)
