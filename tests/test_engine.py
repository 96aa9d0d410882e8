"""Golden tests: every engine's patched logits equal the hooked full forward.

Four tiny models (GPT-2, GPT-2 with the TransformerLens processing of GPT-2 small, Llama, Gemma 3
with random norm weights), every
site kind at the first, a middle and the last layer, batches of mixed lengths (left-padded),
patches at END and at mid-prompt positions; DAS losses and gradients; the runtime guard. The
padded full forward itself is checked against each prompt run alone. A slow test repeats the
checks on SmolLM2 with real IOI pairs.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mlpim.config import compose
from mlpim.engine import cache, fastpath, interventions, patching
from mlpim.engine.batch import PairBatch, PromptBatch, left_pad
from mlpim.engine.family import family_of
from mlpim.engine.interventions import (
    EngineMismatchError,
    guard,
    linear_unembed,
    patched_end_logits,
    patched_end_loss,
    prepare,
    prepare_sites,
)
from mlpim.engine.models import ConfigError, hook_name
from mlpim.engine.subspace import RotatedSubspace

TOL = 1e-4
KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_post", "z")
LAYERS = (0, 1, 2)  # the tiny models have 3 layers: first, middle, last
MODELS = ("tiny_gpt2", "tiny_gpt2_compat", "tiny_llama", "tiny_gemma3")
LENGTHS = (9, 6, 8)  # one batch, three lengths


FAMILIES = ("qwen2", "neox", "olmo2", "phi3", "mistral")  # cache engine only


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


@functools.cache
def family_model(arch: str):
    from mlpim.experiments.common import model_for

    return model_for(compose(["model=tiny", f"model.arch={arch}", "device=cpu"]))


@pytest.fixture(params=FAMILIES)
def family(request):
    return family_model(request.param)


def prompts(model, seed: int, lengths=LENGTHS, mid: bool = False) -> PromptBatch:
    """Random prompts starting with BOS, left-padded; patched at END or at a mid position."""
    gen = torch.Generator().manual_seed(seed)
    bos = model.tokenizer.bos_token_id
    rows = [
        [bos, *torch.randint(1, model.cfg.d_vocab, (n - 1,), generator=gen).tolist()]
        for n in lengths
    ]
    tokens, mask, offset = left_pad(rows, pad_id=bos)
    end = tokens.shape[1] - 1
    pos = offset + torch.tensor([n - 3 - i % 2 for i, n in enumerate(lengths)]) if mid else None
    pos = torch.full((len(rows),), end) if pos is None else pos
    answer = torch.randint(1, model.cfg.d_vocab, (len(rows), 2), generator=gen)
    return PromptBatch(tokens, mask, pos, answer[:, 0], answer[:, 1])


def pair(model, mid: bool = False, lengths=LENGTHS) -> PairBatch:
    base = prompts(model, 1, lengths, mid)
    source = prompts(model, 2, lengths[::-1], mid)
    return PairBatch(base, source, torch.arange(len(lengths)) + 5)


def basis(d: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen))[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype == torch.float32
    return (a - b).abs().max().item()


def check(
    model, pb: PairBatch, kind: str, layer: int, engine: str, setter, matters: bool = True
) -> None:
    """`engine`'s patched logits equal the full forward's; the patch matters (or, `matters`
    False, provably cannot reach END)."""
    fast = prepare_sites(model, pb, [(kind, layer)], engine)[(kind, layer)]
    ref = prepare_sites(model, pb, [(kind, layer)], "full")[(kind, layer)]
    with torch.no_grad():
        ours = patched_end_logits(model, fast, setter)
        slow = patched_end_logits(model, ref, setter)
    assert max_diff(ours, slow) <= TOL
    if matters:  # the comparison says something
        assert max_diff(slow, ref.clean_logits) > 10 * TOL
    else:
        assert max_diff(ours, ref.clean_logits) <= TOL


@pytest.mark.parametrize("engine", ("kernel", "cache"))
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_patch_at_end(model, engine, kind, layer):
    check(model, pair(model), kind, layer, engine, patching.full)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_cache_engine_mid_prompt(model, kind, layer):
    """Patch positions differ per prompt (3 or 4 before END): only the cache engine can. In the
    last block only resid_pre (through keys and values) reaches END from another position."""
    pb = pair(model, mid=True)
    assert not pb.base.at_end
    matters = layer < 2 or kind == "resid_pre"
    check(model, pb, kind, layer, "cache", patching.full, matters)
    with pytest.raises(ConfigError, match="not at END"):
        prepare(model, [pb], kind, layer, "kernel")


@pytest.mark.parametrize("engine", ("kernel", "cache"))
@pytest.mark.parametrize("kind", ("resid_post", "mlp_post"))
def test_subspace_patch(model, engine, kind):
    pb = pair(model)
    d = model.cfg.d_mlp if kind == "mlp_post" else model.cfg.d_model
    check(model, pb, kind, 1, engine, patching.subspace(basis(d, 3, seed=1)))


@pytest.mark.parametrize("mid", (False, True))
def test_padded_forward_equals_each_prompt_alone(model, mid):
    """Left padding with a mask changes nothing: patched END logits of the padded batch equal
    each prompt patched alone, unpadded."""
    pb = pair(model, mid=mid)
    name = hook_name("mlp_post", 1)
    prep = prepare_sites(model, pb, [("mlp_post", 1)], "full")[("mlp_post", 1)]
    with torch.no_grad():
        batched = patched_end_logits(model, prep, patching.full)
        for i in range(len(pb)):
            keep = pb.base.mask[i].bool()
            base = pb.base.tokens[i, keep][None]
            pos = pb.base.pos[i : i + 1] - (~keep).sum()
            hook = patching.patch_hook(patching.full, prep.source_act[i : i + 1], pos)
            alone = model.run_with_hooks(base, fwd_hooks=[(name, hook)])[:, -1]
            assert max_diff(alone[0], batched[i]) <= TOL


@pytest.mark.parametrize(("kind", "layer"), [("resid_post", 1), ("mlp_post", 1), ("mlp_post", 0)])
def test_das_loss_and_gradient(model, kind, layer):
    """DAS losses and gradients agree across engines (kernel: with the fused loss)."""
    pb = pair(model)
    preps = {
        e: prepare_sites(model, pb, [(kind, layer)], e)[(kind, layer)]
        for e in ("full", "kernel", "cache")
    }
    d = preps["full"].base_act.shape[-1]
    rot = RotatedSubspace(d, 2, generator=torch.Generator().manual_seed(0))
    losses, grads = {}, {}
    for engine, prep in preps.items():
        rot.zero_grad()
        loss = patched_end_loss(model, prep, rot)
        loss.backward()
        losses[engine] = loss.item()
        grads[engine] = torch.cat([p.grad.flatten() for p in rot.parameters()])
    ref = grads["full"]
    assert ref.norm() > 0
    for engine in ("kernel", "cache"):
        assert abs(losses[engine] - losses["full"]) <= TOL
        assert ((grads[engine] - ref).norm() / ref.norm()).item() <= TOL


def test_cache_is_never_mutated(model):
    """Resuming twice from one prepared cache gives the same logits."""
    pb = pair(model, mid=True)
    prep = prepare_sites(model, pb, [("resid_post", 1)], "cache")[("resid_post", 1)]
    with torch.no_grad():
        first = patched_end_logits(model, prep, patching.full)
        second = patched_end_logits(model, prep, patching.full)
    assert max_diff(first, second) == 0.0


@pytest.mark.parametrize("engine", ("kernel", "cache"))
def test_guard_stops_a_corrupted_engine(model, engine):
    pb = pair(model)
    prep = prepare_sites(model, pb, [("mlp_post", 1)], engine)[("mlp_post", 1)]
    assert guard(model, prep) <= TOL
    if engine == "kernel":
        prep.state.keys[2] = prep.state.keys[2] * 3.0
    else:
        layer = prep.state.past.layers[2]
        layer.keys = layer.keys * 3.0
    with pytest.raises(EngineMismatchError, match=r"mlp\.hook_post.*max \|Δ\|") as err:
        guard(model, prep)
    advice = str(err.value).split("(try ")[1]
    assert f"engine={engine}" not in advice and "method.engine=full" in advice


def test_auto_picks_kernel_at_end_and_cache_elsewhere(model):
    assert prepare(model, [pair(model)], "mlp_post", 1)[0].engine == "kernel"
    assert prepare(model, [pair(model, mid=True)], "mlp_post", 1)[0].engine == "cache"


@pytest.mark.parametrize("layer", (0, 1))
def test_whole_end_residual_from_source_gives_source_run(model, layer):
    """Base and source share the prefix and differ only in the END token: patching resid_post L
    at END from the source reproduces the source run downstream (resid_post of later layers at
    END, and the logits) through the kernel's blocks."""
    source = prompts(model, 4, lengths=(9, 9, 9))
    tokens = source.tokens.clone()
    tokens[:, -1] = (source.tokens[:, -1] % (model.cfg.d_vocab - 1)) + 1
    base = PromptBatch(tokens, source.mask, source.pos, source.answer, source.other)
    n = model.cfg.n_layers
    name = hook_name("resid_post", layer)
    later = [hook_name("resid_post", j) for j in range(layer + 1, n)]
    source_act = patching.site_acts(model, source, [name])[name]
    src_logits, src_cache = patching.run_cache(model, source, later)
    clean = patching.logits_end(model, base)
    with torch.no_grad():
        state = fastpath.end_state(model, base, "resid_post", layer)
        fast = fastpath.resume(model, state, source_act)
        h, fast_resid = source_act, {}
        for j in range(layer + 1, n):
            h = fastpath.block_end(model, j, h, state)
            fast_resid[hook_name("resid_post", j)] = h
    assert max_diff(clean, src_logits) > 100 * TOL  # the END token matters
    assert max_diff(fast, src_logits) <= TOL
    for x in later:
        assert max_diff(fast_resid[x], src_cache[x][:, -1]) <= TOL


def test_fork_leaves_the_prefix_cache_alone(tiny_llama):
    pb = pair(tiny_llama, mid=True)
    state = cache.cache_state(tiny_llama, pb.base)
    before = [layer.keys.shape for layer in state.past.layers]
    cache.resume(
        tiny_llama,
        state,
        hook_name("resid_post", 0),
        patching.full,
        torch.zeros(len(pb), tiny_llama.cfg.d_model),
    )
    assert [layer.keys.shape for layer in state.past.layers] == before


@pytest.mark.parametrize("mid", (False, True))
@pytest.mark.parametrize("kind", KINDS)
def test_cache_engine_on_other_families(family, kind, mid, layer=1):
    """Gemma 3 (sliding windows, QK norm, sandwich norms), Qwen2 (QKV biases), GPT-NeoX
    (parallel residual, partial rotary), OLMo 2, Phi-3, Mistral: the cache engine equals the
    full forward; the kernel refuses them."""
    matters = True  # layer 1 of 3: every site reaches END from any position
    check(family, pair(family, mid=mid), kind, layer, "cache", patching.full, matters)
    assert family_of(family).kernel_refusal is not None


def test_other_families_das_gradient_and_guard(family):
    pb = pair(family, mid=True)
    preps = {
        e: prepare_sites(family, pb, [("mlp_post", 1)], e)[("mlp_post", 1)]
        for e in ("full", "cache")
    }
    rot = RotatedSubspace(family.cfg.d_mlp, 2, generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for prep in preps.values():
        rot.zero_grad()
        loss = patched_end_loss(family, prep, rot)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in rot.parameters()]))
    assert abs(losses[0] - losses[1]) <= TOL
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() <= TOL
    assert prepare(family, [pb], "mlp_post", 1)[0].engine == "cache"
    for layer in preps["cache"].state.past.layers:
        layer.values = layer.values * 3.0 + 1.0
    with pytest.raises(EngineMismatchError):
        guard(family, preps["cache"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("resid_post", "mlp_post"))
def test_smollm2_engines_on_ioi_pairs(smollm2, kind):
    from mlpim.tasks.ioi import paper_pairs

    cfg = compose(["model=smollm2-135m", "device=cpu"])
    model = smollm2
    layers = (cfg.model.landmarks.mlp_in_the_middle, cfg.model.landmarks.handover_layer)
    d = model.cfg.d_mlp if kind == "mlp_post" else model.cfg.d_model
    pb = paper_pairs(model.tokenizer, cfg.dataset, "test", 0)[0]
    assert len(set(pb.base.mask.sum(1).tolist())) > 1  # mixed lengths in one batch
    for layer in layers:
        for engine in ("kernel", "cache"):
            for setter in (patching.full, patching.subspace(basis(d, 3, seed=layer))):
                check(model, pb, kind, layer, engine, setter)
        preps = {
            e: prepare_sites(model, pb, [(kind, layer)], e)[(kind, layer)]
            for e in ("full", "kernel")
        }
        setter = patching.subspace(basis(d, 3, seed=layer))
        with torch.no_grad():
            fused, plain = (patched_end_loss(model, preps[e], setter).item() for e in preps)
        assert abs(fused - plain) <= TOL


# ------------------------------------------------- the preparation's shortcuts vs the plain runs
@pytest.fixture(params=MODELS + FAMILIES)
def any_model(request):
    if request.param in FAMILIES:
        return family_model(request.param)
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("mid", (False, True))
def test_end_only_logits_equal_the_plain_forward(any_model, mid):
    """`run_cache` asks the model for END logits only (`logits_to_keep=1`): they equal the END
    column of the plain forward's logits, and the model really computed one column."""
    pb = pair(any_model, mid=mid)
    name = hook_name("mlp_post", 1)
    logits, _ = patching.run_cache(any_model, pb.base, [name])
    assert max_diff(logits, patching.logits_end(any_model, pb.base)) <= TOL
    raw, _ = patching.cached_run(any_model, pb.base, [name], logits_to_keep=1)
    assert raw.shape[1] == 1


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_source_run_stopped_after_the_site_equals_the_full_run(any_model, kind, layer):
    """`site_acts` stops the forward after the site's block: the activations equal a full run's."""
    pb = pair(any_model, mid=True)
    name = hook_name(kind, layer)
    fast = patching.site_acts(any_model, pb.source, [name])[name]
    _, full_cache = patching.cached_run(any_model, pb.source, [name])
    assert max_diff(fast, patching.at(full_cache[name], pb.source.pos)) <= TOL
    assert fast.abs().max() > 0


def test_last_block_of_hook_names():
    assert patching.last_block(["blocks.2.mlp.hook_post", "blocks.10.hook_resid_post"]) == 10
    assert patching.last_block(["blocks.0.attn.hook_z", "hook_embed"]) is None
    assert patching.last_block(["ln_final.hook_normalized"]) is None


@pytest.mark.parametrize("mid", (False, True))
def test_base_run_cache_equals_the_prefix_run(any_model, mid, monkeypatch):
    """`base_run` crops the KV cache of its one full forward to the prefix: it equals the cache
    of the prefix run alone (`cache_state`) on every real column, and its END logits the plain
    forward's. Only where
    the cache cannot be cropped (tiny Gemma 3: prompts longer than its sliding window of 4)
    does the prefix run again."""
    pb = pair(any_model, mid=mid)
    name = hook_name("resid_post", 1)
    calls = []
    prefix = cache.prefix
    monkeypatch.setattr(cache, "prefix", lambda *a: calls.append(1) or prefix(*a))
    logits, acts, state = cache.base_run(any_model, pb.base, [name])
    monkeypatch.undo()
    ref = cache.cache_state(any_model, pb.base)
    assert len(calls) == (any_model.cfg.model_name == "tiny-gemma3")
    assert (state.start, state.past.get_seq_length()) == (ref.start, ref.past.get_seq_length())
    keep = pb.base.mask[:, : state.start].bool()  # padding columns are never attended to

    def real(x):
        """[b, heads, cached, dh] -> [real columns, heads, dh] (a sliding layer keeps the last)."""
        return x.transpose(1, 2)[keep[:, keep.shape[1] - x.shape[2] :]]

    for ours, theirs in zip(state.past.layers, ref.past.layers, strict=True):
        assert max_diff(real(ours.keys), real(theirs.keys)) <= TOL
        assert max_diff(real(ours.values), real(theirs.values)) <= TOL
    assert max_diff(logits, patching.logits_end(any_model, pb.base)) <= TOL
    assert acts[name].shape[:2] == pb.base.tokens.shape


def test_cache_engine_fuses_the_unembedding_where_the_logits_are_linear(any_model):
    """Every tiny model's logits are its unembedding's input times W_U plus b_U, so the cache
    engine's DAS loss takes the fused path (whose loss and gradient the tests above check
    against the full forward); the fused loss equals cross-entropy of the engine's logits."""
    pb = pair(any_model, mid=True)
    prep = prepare_sites(any_model, pb, [("mlp_post", 1)], "cache")[("mlp_post", 1)]
    assert linear_unembed(any_model, prep)
    rot = RotatedSubspace(any_model.cfg.d_mlp, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = patched_end_loss(any_model, prep, rot).item()
        logits = patched_end_logits(any_model, prep, rot)
    assert abs(fused - torch.nn.functional.cross_entropy(logits, pb.label).item()) <= TOL


def test_cache_engine_falls_back_where_the_unembedding_is_not_linear(tiny_llama, monkeypatch):
    """With W_U scaled (as a soft-capped or otherwise different head would look), the check
    fails and the loss comes from the model's own logits: it still equals the full forward's."""
    pb = pair(tiny_llama, mid=True)
    preps = {e: prepare_sites(tiny_llama, pb, [("mlp_post", 1)], e) for e in ("full", "cache")}
    preps = {e: p[("mlp_post", 1)] for e, p in preps.items()}
    w_t, b = fastpath.unembed_weights(tiny_llama)
    monkeypatch.setitem(tiny_llama.__dict__, "_mlpim_unembed", (2 * w_t, b))
    monkeypatch.delitem(tiny_llama.__dict__, "_mlpim_linear_unembed", raising=False)
    assert not linear_unembed(tiny_llama, preps["cache"])
    rot = RotatedSubspace(tiny_llama.cfg.d_mlp, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [patched_end_loss(tiny_llama, p, rot).item() for p in preps.values()]
    assert abs(losses[0] - losses[1]) <= TOL
    monkeypatch.undo()
    tiny_llama.__dict__.pop("_mlpim_linear_unembed", None)


def _lds_agree(model, pb: PairBatch, engines: tuple[str, ...]) -> None:
    """Each engine's `patched_end_lds` equals its whole-vocabulary logits' differences, and the
    first engine's (the full forward's)."""
    rot = RotatedSubspace(model.cfg.d_mlp, 2, generator=torch.Generator().manual_seed(0))
    a, o = pb.base.answer[:, None], pb.base.other[:, None]
    ref = None
    with torch.no_grad():
        for engine in engines:
            prep = prepare_sites(model, pb, [("mlp_post", 1)], engine)[("mlp_post", 1)]
            lds = interventions.patched_end_lds(model, prep, rot)
            logits = patched_end_logits(model, prep, rot)
            ref = lds if ref is None else ref
            assert max_diff(lds, logits.gather(1, a)[:, 0] - logits.gather(1, o)[:, 0]) <= TOL
            assert max_diff(lds, ref) <= TOL


@pytest.mark.parametrize("mid", (False, True))
def test_patched_lds_from_two_columns_equal_the_full_logits(any_model, mid):
    """`patched_end_lds` reads two unembedding columns where the unembedding is linear: the
    cache engine's equal the full forward's, on every family, at END and mid-prompt."""
    _lds_agree(any_model, pair(any_model, mid=mid), ("full", "cache"))


def test_patched_lds_of_the_kernel_equal_the_full_logits(model):
    """The kernel's two-column logit differences equal the full forward's (patched at END)."""
    _lds_agree(model, pair(model), ("full", "kernel"))


def test_patched_lds_fall_back_to_the_logits_where_the_unembedding_is_not_linear(
    tiny_llama, monkeypatch
):
    """With the linearity check failing, the logit differences come from the model's own logits."""
    pb = pair(tiny_llama, mid=True)
    prep = prepare_sites(tiny_llama, pb, [("mlp_post", 1)], "cache")[("mlp_post", 1)]
    w_t, b = fastpath.unembed_weights(tiny_llama)
    monkeypatch.setitem(tiny_llama.__dict__, "_mlpim_unembed", (2 * w_t, b))
    monkeypatch.setitem(tiny_llama.__dict__, "_mlpim_linear_unembed", False)
    rot = RotatedSubspace(tiny_llama.cfg.d_mlp, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lds = interventions.patched_end_lds(tiny_llama, prep, rot)
        logits = patched_end_logits(tiny_llama, prep, rot)
    a, o = pb.base.answer, pb.base.other
    assert torch.equal(lds, logits.gather(1, a[:, None])[:, 0] - logits.gather(1, o[:, None])[:, 0])
    monkeypatch.undo()
    tiny_llama.__dict__.pop("_mlpim_linear_unembed", None)


@pytest.mark.slow
def test_gemma3_engines_on_ioi_pairs(gemma3):
    """Gemma 3 270M (sliding windows, QK norm, sandwich norms, 262k vocabulary), one IOI batch
    at MLP10: the preparation's END-only logits equal the plain forward's, the kernel and the
    cache engine equal the full forward for whole and subspace patches, and their fused DAS
    losses and gradients equal the full forward's."""
    from mlpim.tasks.ioi import paper_pairs

    cfg = compose(["model=gemma3-270m", "device=cpu"])
    layer = 10  # no landmark by the rule; the block where the END position signal peaks
    pb = paper_pairs(gemma3.tokenizer, cfg.dataset, "test", 0)[0]
    assert family_of(gemma3).kernel_refusal is None
    site, engines = ("mlp_post", layer), ("full", "kernel", "cache")
    preps = {e: prepare_sites(gemma3, pb, [site], e)[site] for e in engines}
    assert max_diff(preps["cache"].clean_logits, patching.logits_end(gemma3, pb.base)) <= TOL
    assert linear_unembed(gemma3, preps["cache"])
    rot = RotatedSubspace(gemma3.cfg.d_mlp, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for setter in (patching.full, rot):
            ref = patched_end_logits(gemma3, preps["full"], setter)
            assert max_diff(ref, preps["full"].clean_logits) > 10 * TOL
            for e in engines[1:]:
                assert max_diff(patched_end_logits(gemma3, preps[e], setter), ref) <= TOL
    grads, losses = [], []
    for prep in preps.values():
        rot.zero_grad()
        loss = patched_end_loss(gemma3, prep, rot)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in rot.parameters()]))
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        assert abs(loss - losses[0]) <= TOL
        assert ((grad - grads[0]).norm() / grads[0].norm()).item() <= TOL


def test_length_groups_split_where_padding_drops():
    mask = lambda lengths: left_pad([[1] * n for n in lengths], 0)[1]  # noqa: E731
    groups = patching.length_groups(mask([9, 6, 8]))  # 27 padded columns -> 6 + 2 * 9 = 24
    assert [g.tolist() for g in groups] == [[1], [2, 0]]
    assert [g.tolist() for g in patching.length_groups(mask([9, 8, 8, 9]))] == [[0, 1, 2, 3]]
    assert [g.tolist() for g in patching.length_groups(mask([5]))] == [[0]]
    sub = patching.select_rows(pair(family_model("qwen2")).base, torch.tensor([1]))
    assert sub.tokens.shape == (1, 6) and bool(sub.mask.all())  # row 1 alone: no padding


@pytest.mark.parametrize("engine", ("kernel", "cache", "full"))
def test_prepare_in_length_groups_equals_one_group(any_model, engine, monkeypatch):
    """The base and source runs in two groups of similar length (the test batch's lengths 9, 6,
    8 split) give the activations, END logits and patched logits of one padded run."""
    model = any_model
    if engine == "kernel" and family_of(model).kernel_refusal:
        pytest.skip("the kernel does not run this family")
    pb, site = pair(model, mid=engine == "cache"), ("mlp_post", 1)
    assert len(patching.length_groups(pb.base.mask)) == 2
    grouped = prepare_sites(model, pb, [site], engine)[site]
    monkeypatch.setattr(patching, "length_groups", lambda mask: [torch.arange(len(mask))])
    monkeypatch.setattr(interventions, "length_groups", patching.length_groups)
    whole = prepare_sites(model, pb, [site], engine)[site]
    for field in ("base_act", "source_act", "clean_logits"):
        assert max_diff(getattr(grouped, field), getattr(whole, field)) <= TOL
    with torch.no_grad():
        ours, ref = (patched_end_logits(model, p, patching.full) for p in (grouped, whole))
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ref, whole.clean_logits) > 10 * TOL


def test_same_prompts_compares_real_tokens_and_the_column_from_end():
    a = left_pad([[1, 2, 3], [4, 5]], 0)
    b = left_pad([[1, 2, 3], [6, 6, 6, 6]], 0)  # wider: row 0 is padded differently
    batch = lambda t, pos: PromptBatch(t[0], t[1], pos, t[2], t[2])  # noqa: E731
    base, source = batch(a, torch.tensor([2, 2])), batch(b, torch.tensor([3, 3]))
    assert patching.same_prompts(base, source).tolist() == [True, False]
    moved = batch(b, torch.tensor([2, 3]))  # row 0 patched one column earlier
    assert patching.same_prompts(base, moved).tolist() == [False, False]


@pytest.mark.parametrize("engine", ("kernel", "cache", "full"))
@pytest.mark.parametrize("kind", ("resid_post", "mlp_post", "z"))
def test_a_source_that_is_its_base_prompt_takes_the_base_run(tiny_llama, engine, kind, monkeypatch):
    """Rows whose source is the base prompt itself (IOI's same-pattern train pairs) take the
    base run's activations without a source run; they equal a plain run of the whole source
    batch, the other rows run alone, and the full patch of those rows is the clean run."""
    model, site = tiny_llama, (kind, 1)
    base, other = prompts(model, 1), prompts(model, 2, LENGTHS)
    same = torch.tensor([True, False, True])
    pick = lambda a, b: torch.where(same[:, None] if a.dim() == 2 else same, a, b)  # noqa: E731
    fields = ("tokens", "mask", "pos", "answer", "other")
    source = PromptBatch(*(pick(getattr(base, f), getattr(other, f)) for f in fields))
    pb = PairBatch(base, source, torch.arange(3) + 5)
    assert patching.same_prompts(pb.base, pb.source).tolist() == same.tolist()
    ran = []
    plain = patching.site_acts
    monkeypatch.setattr(patching, "site_acts", lambda m, b, n: ran.append(len(b)) or plain(m, b, n))
    prep = prepare_sites(model, pb, [site], engine)[site]
    assert ran == [1]  # only the one source that is not its base prompt ran
    name = prep.name
    assert torch.equal(prep.source_act[same], prep.base_act[same])
    assert max_diff(prep.source_act, plain(model, pb.source, [name])[name]) <= TOL
    with torch.no_grad():
        patched = patched_end_logits(model, prep, patching.full)
    assert max_diff(patched[same], prep.clean_logits[same]) <= TOL
    assert max_diff(patched[~same], prep.clean_logits[~same]) > 10 * TOL


def test_kernel_block_outputs_are_the_models_hooks(model):
    """`mlp_out_from_post` and `attn_out_from_z` give the model's own hook_mlp_out and
    hook_attn_out at END (through Gemma 3's post-norms), as ioi_dormant and path patching read
    them."""
    pb = pair(model)
    names = [hook_name(k, 1) for k in ("mlp_post", "mlp_out", "z", "attn_out")]
    _, acts = patching.run_cache(model, pb.base, names)
    post, mlp_out, z, attn_out = (acts[n][:, -1] for n in names)
    with torch.no_grad():
        assert max_diff(fastpath.mlp_out_from_post(model, 1, post), mlp_out) <= TOL
        assert max_diff(fastpath.attn_out_from_z(model, 1, z), attn_out) <= TOL
