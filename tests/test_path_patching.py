"""Path patching (mlpim.analysis.paths, runner ioi_path_patching) on the tiny models.

The END trace reproduces the model's logits; with the final-norm scale frozen the per-head and
per-MLP direct effects add up to the intervention's total direct effect; the query-only and
output-only path patches equal the same patches done with TransformerLens hooks; an identity
patch changes nothing; and the experiment runs end to end.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mlpim import constants as C
from mlpim.analysis import paths
from mlpim.config import compose
from mlpim.engine import fastpath, metrics
from mlpim.engine.family import post_attn_norm
from mlpim.engine.models import hook_name
from mlpim.engine.patching import full, logits_end, subspace
from mlpim.run import run
from mlpim.tasks.ioi import paper_pairs

ATOL = 1e-6
MODELS = ("tiny_gpt2", "tiny_gpt2_compat", "tiny_llama", "tiny_gemma3")
SITES = (("resid_post", 1), ("mlp_post", 1), ("resid_post", 0))


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", params=MODELS)
def model64(request):
    """A float64 copy: the hooked comparisons subtract nearly equal residuals, and the tiny random
    models' attention moves little, so float32 rounding would be a visible share of the effect."""
    m = copy.deepcopy(request.getfixturevalue(request.param)).double()
    m.__dict__.pop("_mlpim_attn_weights", None)  # fastpath's float32 weight cache
    return m


@pytest.fixture(scope="module")
def pair():
    """One test batch of IOI pairs (the tiny models share the word tokenizer)."""
    from mlpim.experiments.common import model_for

    cfg = compose(["model=tiny", "device=cpu"])
    return paper_pairs(model_for(cfg).tokenizer, cfg.dataset, "test", 0)[0]


def _setup(model, pb, kind: str, layer: int, setter=full):
    """Prefix state, clean trace, patched trace (site patched from the source), readout."""
    state, clean, base_acts = paths.run_trace(model, pb.base, [(kind, layer)])
    _, _, src_acts = paths.run_trace(model, pb.source, [(kind, layer)])
    name = hook_name(kind, layer)
    act = setter(base_acts[name], src_acts[name])
    with torch.no_grad():
        patched = paths.patched_trace(model, state, clean, kind, layer, act)
    return state, clean, patched, paths.readout(model, pb.base.io, pb.base.s), act


def _rows(batch, keep: torch.Tensor):
    """The rows `keep` of a (prompt) batch."""
    vals = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dataclasses.replace(
        batch,
        **{
            k: v[keep]
            if torch.is_tensor(v)
            else tuple(x for x, k_ in zip(v, keep.tolist(), strict=True) if k_)
            for k, v in vals.items()
        },
    )


def _unpadded(pb):
    """The pairs with no left padding: HF's float64 Llama turns fully masked rows into NaN, and
    0 * NaN reaches the real tokens (float32 is unaffected; the engine's guard would stop it)."""
    keep = pb.base.mask.bool().all(1) & pb.source.mask.bool().all(1)
    assert keep.sum() >= 2
    return dataclasses.replace(
        pb, base=_rows(pb.base, keep), source=_rows(pb.source, keep), label=pb.label[keep]
    )


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return (a - b).abs().max().item() <= atol


def _close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-2) -> bool:
    """Equal up to rtol of the reference's largest entry, which must not be zero. (HF's Llama
    norms and rotary tables stay float32 in a float64 model: ~1e-3 of these tiny effects.)"""
    scale = b.abs().max().item()
    return scale > 0 and (a - b).abs().max().item() <= rtol * scale


def _additive(model) -> None:
    """Skip where a post-attention norm (Gemma 3) makes per-head effects non-additive."""
    if post_attn_norm(model, 0) is not None:
        pytest.skip("the post-attention norm is recomputed: per-head effects do not add up")


def _site_patch_hook(name: str, act: torch.Tensor):
    def hook(x, hook=None):
        x = x.clone()
        x[:, -1] = act
        return x

    return name, hook


@pytest.mark.parametrize(("kind", "layer"), SITES)
def test_trace_reproduces_logit_diff(model, pair, kind, layer):
    state, clean, patched, r, act = _setup(model, pair, kind, layer)
    with torch.no_grad():
        ld = metrics.logit_diff(logits_end(model, pair.base), pair.base.io, pair.base.s)
        ref = fastpath.resume(model, fastpath.end_state(model, pair.base, kind, layer), act)
        patched_ld = paths.logit_diff(model, r, patched.final)
    assert _close(paths.logit_diff(model, r, clean.final), ld, 1e-5)
    assert _close(patched_ld, metrics.logit_diff(ref, pair.base.io, pair.base.s), 1e-5)
    moved = paths.site_resid(model, clean, kind, layer, act) - clean.resid_post(layer)
    if moved.abs().max() > 1e-4:  # the patch moves the site (not where a sliding window hides
        assert not _close(patched_ld, ld, 1e-4)  # the source's difference: Gemma 3's layer 0)
    else:
        assert (kind, layer) == ("resid_post", 0) and model.cfg.model_name == "tiny-gemma3"


def test_frozen_readout_is_the_final_norm(model, pair):
    """LD = final residual · g + the final norm's bias term + the unembedding bias difference."""
    _, clean, _, r, _ = _setup(model, pair, "resid_post", 1)
    bias = getattr(model.ln_final.original_component, "bias", None)
    bias_term = 0.0 if bias is None else r.u @ bias
    g = paths.frozen_readout(model, r, clean.final)
    lhs = paths.logit_diff(model, r, clean.final)
    assert _close(lhs, paths.dla(clean.final, g) + bias_term + r.c, 1e-5)


@pytest.mark.parametrize(("kind", "layer"), SITES)
def test_direct_effects_add_up_with_frozen_norm(model, pair, kind, layer):
    """Σ heads (output alone from the patched run) + Σ MLPs + the site's own direct effect
    = the DLA of the total change of the final residual (final-norm scale frozen)."""
    _additive(model)
    _, clean, patched, r, act = _setup(model, pair, kind, layer)
    heads = paths.output_effects(model, r, clean, patched, frozen=True)
    mlps = paths.mlp_effects(model, r, clean, patched, frozen=True)
    g = paths.frozen_readout(model, r, clean.final)
    site = paths.site_resid(model, clean, kind, layer, act) - clean.resid_post(layer)
    total = paths.dla(patched.final - clean.final, g)
    parts = sum(v.sum(-1) for v in heads.values()) + sum(mlps.values()) + paths.dla(site, g)
    assert sorted(heads) == list(range(layer + 1, model.cfg.n_layers))
    assert total.abs().max() > 1e-4
    assert _close(parts, total)


def _hooked_final(model, pb, hooks: list) -> torch.Tensor:
    """END final residual (before the final norm) of the base run with `hooks`."""
    name = hook_name("resid_post", model.cfg.n_layers - 1)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(
            pb.base.tokens, attention_mask=pb.base.mask, names_filter=[name]
        )
    return cache[name][:, -1]


def _cached(model, pb, names: list[str], hooks: list) -> dict[str, torch.Tensor]:
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(
            pb.base.tokens, attention_mask=pb.base.mask, names_filter=names
        )
    return {n: cache[n][:, -1] for n in names}


def test_query_only_for_last_layer_equals_hooked_query_patch(model64, pair):
    """All last-layer heads' query effects (everything downstream fixed, norm frozen) sum to the
    effect of patching the last layer's END queries from the patched run with hooks."""
    _additive(model64)
    model, last, pair = model64, model64.cfg.n_layers - 1, _unpadded(pair)
    kind, layer = "resid_post", last - 1
    state, clean, patched, r, act = _setup(model, pair, kind, layer)
    q_name, mlp_name = f"blocks.{last}.attn.hook_q", hook_name("mlp_out", last)
    patched_q = _cached(model, pair, [q_name], [_site_patch_hook(hook_name(kind, layer), act)])
    clean_mlp = _cached(model, pair, [mlp_name], [])[mlp_name]
    final = _hooked_final(
        model,
        pair,
        [_site_patch_hook(q_name, patched_q[q_name]), _site_patch_hook(mlp_name, clean_mlp)],
    )
    effects = paths.query_effects(model, state, r, clean, patched, frozen=True)
    assert list(effects) == [last]
    hooked = paths.dla(final - clean.final, paths.frozen_readout(model, r, clean.final))
    assert _close_rel(effects[last].sum(-1), hooked)


def test_head_output_alone_equals_hooked_head_patch(model64, pair):
    """ΔLD with one last-layer head's output from the patched run (final norm recomputed) equals
    the hooked run that sets that head's hook_z and keeps the last MLP's output clean."""
    model, last, pair = model64, model64.cfg.n_layers - 1, _unpadded(pair)
    _, clean, patched, r, _ = _setup(model, pair, "resid_post", last - 1)
    z_name, mlp_name = hook_name("z", last), hook_name("mlp_out", last)
    clean_mlp = _cached(model, pair, [mlp_name], [])[mlp_name]
    effects = paths.output_effects(model, r, clean, patched)[last]
    for h in range(model.cfg.n_heads):
        z = clean.z[last].clone()
        z[:, h] = patched.z[last][:, h]
        final = _hooked_final(
            model, pair, [_site_patch_hook(z_name, z), _site_patch_hook(mlp_name, clean_mlp)]
        )
        delta = paths.logit_diff(model, r, final) - paths.logit_diff(model, r, clean.final)
        assert _close_rel(effects[:, h], delta)


def test_head_outputs_add_up_to_the_attention_output(model, pair):
    """The heads' outputs (through a post-attention norm frozen at the run's scale) plus b_O's
    share are the block's hook_attn_out, as the model computes it."""
    _, clean, _, _, _ = _setup(model, pair, "resid_post", 0)
    name = hook_name("attn_out", 1)
    own = _cached(model, pair, [name], [])[name]
    w = fastpath.attn_weights(model, 1)
    b_o = paths.head_outputs(model, 1, torch.zeros_like(clean.z[1]))  # zero: b_O alone
    bias = fastpath.attn_out_from_z(model, 1, clean.z[1]) - paths.head_outputs(
        model, 1, clean.z[1]
    ).sum(1)
    assert _close(paths.head_outputs(model, 1, clean.z[1]).sum(1) + bias, own, 1e-5)
    if post_attn_norm(model, 1) is None:
        assert _close(bias, w.bo.expand_as(bias), 1e-5)
        assert _close(b_o, torch.zeros_like(b_o))


def test_trace_stops_where_it_differs_from_the_model(tiny_llama, pair, monkeypatch):
    """A trace that does not reproduce the model's logits (here: a block left out) stops."""
    real = paths.trace
    monkeypatch.setattr(paths, "trace", lambda m, st, h, start: real(m, st, h, start + 1))
    with pytest.raises(paths.EngineMismatchError, match="path patching's END trace"):
        paths.run_trace(tiny_llama, pair.base, [("resid_post", 1)])


@pytest.mark.parametrize(("kind", "layer"), SITES)
def test_identity_patch_changes_nothing(model, pair, kind, layer):
    """A head's output (or query) patched with its own clean value: every effect is zero, up to
    a few float32 steps of the residual (the hooked site and the trace differ by rounding)."""
    state, clean, patched, r, _ = _setup(model, pair, kind, layer, setter=lambda b, s: b)
    atol = max(ATOL, 4 * torch.finfo(torch.float32).eps * clean.final.abs().max().item())
    for frozen in (False, True):
        found = [
            paths.output_effects(model, r, clean, patched, frozen),
            paths.query_effects(model, state, r, clean, patched, frozen),
            paths.mlp_effects(model, r, clean, patched, frozen),
        ]
        for by_layer in found:
            assert all(_close(v, torch.zeros_like(v), atol) for v in by_layer.values())
    dla_clean, dla_patched = paths.head_dla(model, r, clean), paths.head_dla(model, r, patched)
    assert all(_close(v, dla_clean[i], atol) for i, v in dla_patched.items())


def test_subspace_patch_runs_on_mlp_post(tiny_llama, pair):
    """A 1-D subspace patch of the MLP's hidden activations reaches the downstream heads."""
    d = tiny_llama.cfg.d_mlp
    v = torch.linalg.qr(torch.randn(d, 1, generator=torch.Generator().manual_seed(0)))[0]
    _, clean, patched, r, _ = _setup(tiny_llama, pair, "mlp_post", 0, subspace(v))
    assert any(
        t.abs().max() > 0 for t in paths.output_effects(tiny_llama, r, clean, patched).values()
    )


def test_runs_end_to_end(tmp_path):
    overrides = [
        "experiment=ioi_path_patching",
        "model=tiny",
        "method.epochs=1",
        "device=cpu",
        "dataset.n_train_pairs=20",
        "dataset.n_test_pairs=20",
    ]
    df = run(compose(overrides), tmp_path)
    for name in ("path_patching.png", C.METRICS, "subspace_resid.pt", "subspace_mlp.pt"):
        assert (tmp_path / name).exists(), name
    z = df[df.site == "z"]
    assert set(z.metric) == {"ld_via_head_output", "ld_via_query", "dla"}
    assert {"clean", "source_run", "v_resid", "v_mlp", "mlp_full"} <= set(df.intervention)
    v_resid = z[(z.intervention == "v_resid") & (z.metric == "ld_via_query")]
    assert set(v_resid.layer) == {2} and len(v_resid) == 4  # heads after the handover layer
    assert df.value.notna().all()


def test_refuses_a_model_the_kernel_cannot_run_before_training(tmp_path):
    """GPT-NeoX's parallel blocks are not the kernel's: one line, and no direction trained."""
    from mlpim.errors import ConfigError

    overrides = ["experiment=ioi_path_patching", "model=tiny", "model.arch=neox", "device=cpu"]
    with pytest.raises(ConfigError, match="traces END with the kernel, which cannot: model_type"):
        run(compose(overrides), tmp_path)
    assert not list(tmp_path.glob("subspace_*.pt"))
