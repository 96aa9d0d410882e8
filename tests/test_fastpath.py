"""Golden tests: the END-only fast path equals full-forward patching with TransformerLens hooks.

Every site kind at the first, a middle and the last layer of three tiny models (GPT-2, GPT-2 with
the TransformerLens processing of GPT-2 small, Llama); full and subspace patches, the unpatched
resume, and DAS gradients. A slow test repeats the value checks on SmolLM2 with real IOI pairs.
"""

from __future__ import annotations

import pytest
import torch

from mlpim.config import compose
from mlpim.engine import fastpath, patching
from mlpim.engine.models import hook_name
from mlpim.engine.subspace import RotatedSubspace

TOL = 1e-4
KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_post", "z")
LAYERS = (0, 1, 2)  # the tiny models have 3 layers: first, middle, last
MODELS = ("tiny_gpt2", "tiny_gpt2_compat", "tiny_llama")
BATCH, SEQ = 3, 9


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


def _tokens(model, seed: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    """Random prompts starting with BOS (no BOS inside)."""
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(1, model.cfg.d_vocab, (batch, seq - 1), generator=gen)
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id)
    return torch.cat([bos, body], dim=1)


def _pair(model) -> tuple[torch.Tensor, torch.Tensor]:
    return _tokens(model, 1), _tokens(model, 2)


def _acts(model, tokens, name: str) -> torch.Tensor:
    return patching.source_activations(model, tokens, [name])[name]


def _basis(d: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen))[0]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype == torch.float32
    return (a - b).abs().max().item()


def _check_patch(model, base, source, kind: str, layer: int, setter) -> None:
    """Fast-path logits with `setter` applied at (kind, layer) equal the hooked full forward."""
    name = hook_name(kind, layer)
    base_act, source_act = _acts(model, base, name), _acts(model, source, name)
    state = fastpath.end_state(model, base, kind, layer)
    with torch.no_grad():
        fast = fastpath.resume(model, state, setter(base_act, source_act))
        slow = patching.patched_logits(model, base, {name: source_act}, {name: setter})
        clean = model(base)[:, -1]
    assert _max_diff(fast, slow) <= TOL
    # the patch must matter, or the comparison says nothing
    assert _max_diff(slow, clean) > 100 * TOL


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_patch_matches_hooks(model, kind, layer):
    base, source = _pair(model)
    _check_patch(model, base, source, kind, layer, patching.full)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", ("resid_post", "mlp_post"))
def test_subspace_patch_matches_hooks(model, kind, layer):
    base, source = _pair(model)
    d = _acts(model, base, hook_name(kind, layer)).shape[-1]
    _check_patch(model, base, source, kind, layer, patching.subspace(_basis(d, 3, seed=layer)))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_unpatched_resume_is_clean(model, kind, layer):
    base = _tokens(model, 3)
    base_act = _acts(model, base, hook_name(kind, layer))
    state = fastpath.end_state(model, base, kind, layer)
    with torch.no_grad():
        fast = fastpath.resume(model, state, base_act)
        clean = model(base)[:, -1]
    assert _max_diff(fast, clean) <= TOL


@pytest.mark.parametrize(("kind", "layer"), [("resid_post", 1), ("mlp_post", 1), ("mlp_post", 0)])
def test_das_gradient_matches_hooks(model, kind, layer):
    base, source = _pair(model)
    name = hook_name(kind, layer)
    base_act, source_act = _acts(model, base, name), _acts(model, source, name)
    state = fastpath.end_state(model, base, kind, layer)
    label = torch.arange(BATCH) + 5

    # one module for both paths: its parameter gradient also depends on the orthogonal
    # completion the parametrization keeps, which is not determined by `generator` alone
    rot = RotatedSubspace(base_act.shape[-1], 2, generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for path in ("hooks", "fast", "fast_fused"):
        rot.zero_grad()
        if path == "fast_fused":  # what training uses: the fused unembedding + cross-entropy
            loss = fastpath.resume_loss(model, state, rot(base_act, source_act), label)
        else:
            logits = (
                fastpath.resume(model, state, rot(base_act, source_act))
                if path == "fast"
                else patching.patched_logits(model, base, {name: source_act}, {name: rot})
            )
            loss = torch.nn.functional.cross_entropy(logits, label)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in rot.parameters()]))
    slow_grad = grads[0]
    assert slow_grad.norm() > 0
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        assert abs(loss - losses[0]) <= TOL
        assert ((grad - slow_grad).norm() / slow_grad.norm()).item() <= TOL


@pytest.mark.parametrize("layer", (0, 1))
def test_whole_end_residual_from_source_gives_source_run(model, layer):
    """Base and source share the prefix and differ only in the END token: patching resid_post L
    at END from the source reproduces the source run downstream (resid_post of later layers at
    END, and the logits), both with hooks and with the fast path."""
    source = _tokens(model, 4)
    base = source.clone()
    base[:, -1] = (source[:, -1] % (model.cfg.d_vocab - 1)) + 1  # another non-BOS token
    assert (base[:, -1] != source[:, -1]).all() and (base[:, :-1] == source[:, :-1]).all()
    n = model.cfg.n_layers
    name = hook_name("resid_post", layer)
    later = [hook_name("resid_post", j) for j in range(layer + 1, n)]
    source_act = _acts(model, source, name)

    def patch(act, hook=None):
        act = act.clone()
        act[:, -1] = source_act
        return act

    with torch.no_grad():
        src_logits, src_cache = model.run_with_cache(source, names_filter=lambda x: x in later)
        with model.hooks(fwd_hooks=[(name, patch)]):
            logits, cache = model.run_with_cache(base, names_filter=lambda x: x in later)
        clean_logits = model(base)[:, -1]
        state = fastpath.end_state(model, base, "resid_post", layer)
        fast = fastpath.resume(model, state, source_act)
        h, fast_resid = source_act, {}
        for j in range(layer + 1, n):
            h = fastpath.block_end(model, j, h, state)
            fast_resid[hook_name("resid_post", j)] = h
    assert _max_diff(clean_logits, src_logits[:, -1]) > 100 * TOL  # the END token matters
    assert _max_diff(logits[:, -1], src_logits[:, -1]) <= 1e-5
    assert _max_diff(fast, src_logits[:, -1]) <= TOL
    for x in later:
        assert _max_diff(cache[x][:, -1], src_cache[x][:, -1]) <= 1e-5
        assert _max_diff(fast_resid[x], src_cache[x][:, -1]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("resid_post", "mlp_post"))
def test_smollm2_fast_path_on_ioi_pairs(smollm2, kind):
    from mlpim.tasks.ioi import paper_pairs

    cfg = compose(["model=smollm2-135m", "device=cpu"])
    model = smollm2
    layers = (cfg.model.landmarks.mlp_in_the_middle, cfg.model.landmarks.handover_layer)
    for pb in paper_pairs(model.tokenizer, cfg.dataset, "test", 0)[:2]:
        for layer in layers:
            d = _acts(model, pb.base.tokens, hook_name(kind, layer)).shape[-1]
            for setter in (patching.full, patching.subspace(_basis(d, 3, seed=layer))):
                _check_patch(model, pb.base.tokens, pb.source.tokens, kind, layer, setter)
            _check_fused_loss(model, pb, kind, layer, patching.subspace(_basis(d, 3, seed=layer)))


def _check_fused_loss(model, pb, kind: str, layer: int, setter) -> None:
    """The fused training loss equals cross-entropy of the hooked full-forward patched logits."""
    name = hook_name(kind, layer)
    base_act, source_act = _acts(model, pb.base.tokens, name), _acts(model, pb.source.tokens, name)
    state = fastpath.end_state(model, pb.base.tokens, kind, layer)
    with torch.no_grad():
        fused = fastpath.resume_loss(model, state, setter(base_act, source_act), pb.label)
        logits = patching.patched_logits(model, pb.base.tokens, {name: source_act}, {name: setter})
        plain = torch.nn.functional.cross_entropy(logits, pb.label)
    assert abs(fused.item() - plain.item()) <= TOL
