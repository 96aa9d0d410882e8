"""What an MLP writes into the residual (`mlpim.analysis.mlp_write`): W_out itself where the block
adds the MLP's output as it is (Llama), W_out through the block's own post-feedforward norm's
Jacobian where it normalises it first (Gemma 3), checked against the model's own forward; a W_out
that does not give the MLP's output from its hidden activation stops the verdict path."""

from __future__ import annotations

import pytest
import torch

from mlpim.analysis import nullspace as ns
from mlpim.analysis.mlp_write import BLOCK_OUT, check_hidden_writes, end_outputs, residual_w_out
from mlpim.config import compose
from mlpim.engine.patching import at, run_cache
from mlpim.errors import MlpimError
from mlpim.tasks.ioi import paper_pairs

LAYER = 1


def _model(arch: str):
    from mlpim.experiments.common import model_for

    return model_for(compose(["model=tiny", f"model.arch={arch}", "device=cpu"]))


def _batches(model):
    cfg = compose(["model=tiny"])
    return [p.base for p in paper_pairs(model.tokenizer, cfg.dataset, "test", 0)[:2]]


def test_a_block_without_a_post_norm_writes_w_out_itself():
    model = _model("llama")
    assert torch.equal(residual_w_out(model, LAYER, _batches(model)), ns.mlp_w_out(model, LAYER))


def test_through_a_post_norm_the_write_is_the_norms_jacobian_times_w_out():
    model = _model("gemma3")
    with (
        torch.no_grad()
    ):  # an uneven gain, as Gemma 3's trained norms have (a new tiny model's is 1)
        for p in model.blocks[LAYER].ln2_post.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 3)
    batches = _batches(model)
    w_resid = residual_w_out(model, LAYER, batches)
    w_out = ns.mlp_w_out(model, LAYER)
    assert w_resid.shape == w_out.shape and not torch.allclose(w_resid, w_out)
    # the model's own forward: nudge the hidden activation at END along v, read what the block adds
    v = torch.randn(w_out.shape[0], generator=torch.Generator().manual_seed(0))
    v, eps = v / v.norm(), 1e-3
    name, out = f"blocks.{LAYER}.mlp.hook_post", BLOCK_OUT.format(layer=LAYER)
    moved = []
    for b in batches:
        _, clean = run_cache(model, b, [out])

        def nudge(act, hook, b=b):
            act = act.clone()
            act[torch.arange(len(b.pos)), b.pos] += eps * v.to(act)
            return act

        with model.hooks(fwd_hooks=[(name, nudge)]):
            _, pushed = run_cache(model, b, [out])
        moved.append((at(pushed[out], b.pos) - at(clean[out], b.pos)) / eps)
    measured = torch.cat(moved).double().mean(0)
    predicted = v.double() @ w_resid.double()
    assert torch.allclose(measured, predicted, rtol=2e-2, atol=2e-2 * predicted.abs().max().item())
    naive = v.double() @ w_out.double()
    assert ns.cosine(measured, predicted) > 0.999 and ns.cosine(measured, naive) < 0.9


def test_an_unknown_transformation_of_the_mlp_output_is_refused(monkeypatch):
    model = _model("gemma3")
    monkeypatch.setattr(model.blocks[LAYER], "ln2_post", None, raising=False)
    with pytest.raises(MlpimError, match="something other than its MLP's output"):
        residual_w_out(model, LAYER, _batches(model))


def test_the_mlp_steps_run_on_a_family_with_a_post_norm(tmp_path):
    """ioi_nullspace, ioi_alignment and illusion_check on a tiny Gemma 3 (post-feedforward norm:
    what the block adds is not h @ W_out)."""
    import importlib.util
    from pathlib import Path

    from mlpim import constants as C

    script = Path(__file__).resolve().parents[1] / "scripts" / "paper.py"
    spec = importlib.util.spec_from_file_location("paper", script)
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    steps = "ioi_resid8_das,ioi_mlp8_das,ioi_nullspace,ioi_alignment,illusion_check"
    args = ["--only", steps, "--out", str(tmp_path), "model=tiny", "model.arch=gemma3"]
    paper.main([*args, "method.epochs=1", "dataset.n_train_pairs=40", "dataset.n_test_pairs=20"])
    for step in steps.split(","):
        assert (tmp_path / step / C.DONE).exists(), step
    assert (
        "hidden @ W_out + b_out - MLP output| = 0"
        in (tmp_path / "ioi_nullspace" / C.SUMMARY).read_text()
    )


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama", "tiny_gemma3"])
def test_the_hidden_activation_times_w_out_is_the_mlps_output(family, request):
    """hidden @ W_out (+ b_out) equals the MLP module's output at END, within float32 rounding, on
    every family (biased GPT-2, bias-free Llama, Gemma 3 before its post-feedforward norm)."""
    model = request.getfixturevalue(family)
    hidden, pre, _ = end_outputs(model, LAYER, _batches(model))
    assert hidden.shape[-1] == ns.mlp_w_out(model, LAYER).shape[0]
    assert check_hidden_writes(model, LAYER, hidden, pre) <= 1e-5 * pre.abs().max()


def _broken_w_out(monkeypatch, model) -> None:
    """W_out read through the model (the bridge's property) 1% off what the module multiplies by."""
    cls = type(model.blocks[LAYER].mlp)
    right = cls.W_out.fget
    monkeypatch.setattr(cls, "W_out", property(lambda self: right(self) * 1.01))


def test_an_mlp_whose_w_out_does_not_give_its_output_is_stopped(tiny_llama, monkeypatch):
    """A W_out that does not reproduce the MLP's output is refused in one line naming the layer
    and the largest error, where the site's W_out is read (`residual_w_out`)."""
    _broken_w_out(monkeypatch, tiny_llama)
    with pytest.raises(MlpimError, match=r"block 1: the MLP's hidden activation @ W_out .* up to"):
        residual_w_out(tiny_llama, LAYER, _batches(tiny_llama))


def test_the_verdict_path_stops_a_family_whose_w_out_is_wrong(
    tiny_gpt2, tmp_path, capsys, monkeypatch
):
    """`mlpim check` at mlp_post: one `mlpim: error:` line, before any reference is measured."""
    from helpers import PROBE, REFS, assert_one_line_error, cli

    from mlpim.analysis import references as R
    from mlpim.engine.subspace import save_subspace

    v = torch.randn(128, 1, generator=torch.Generator().manual_seed(0))
    save_subspace(tmp_path / "v.pt", v / v.norm(), model="tiny", site="mlp_post", layer=1, k=1)
    _broken_w_out(monkeypatch, tiny_gpt2)  # its class: every tiny GPT-2 the run builds
    measured = []
    monkeypatch.setattr(R, "random_direction_reference", lambda *a: measured.append(a))
    args = [str(tmp_path / "v.pt"), *PROBE, *REFS, f"hydra.run.dir={tmp_path / 'run'}"]
    code, out = cli(capsys, "check", *args)
    assert_one_line_error(code, out, "block 1", "differs from its output by up to")
    assert measured == []
