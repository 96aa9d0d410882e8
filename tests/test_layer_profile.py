"""ioi_layer_profile and the landmark rule: synthetic ioi_locate tables, config composition, and
an end-to-end tiny run whose per-layer numbers equal single-layer ioi_mlp8_das/ioi_resid8_das."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mlpim import constants as C
from mlpim.analysis import landmarks as lmk
from mlpim.analysis.profile import null_fraction, prepare_many
from mlpim.config import compose
from mlpim.engine.interventions import prepare
from mlpim.errors import ConfigError, MlpimError
from mlpim.experiments.ioi_layer_profile import profile_layers, read_locate
from mlpim.run import run
from mlpim.tasks.ioi import make_pairs

TINY = [
    "model=tiny",
    "device=cpu",
    "method.epochs=2",
    "dataset.n_train_pairs=20",
    "dataset.n_test_pairs=20",
    "dataset.n_eval_prompts=20",
    "seed=3",
]


def locate_table(
    attn: dict[int, float],
    resid: dict[int, float],
    n_layers: int = 12,
    heads: dict[tuple[int, int], float] | None = None,
) -> pd.DataFrame:
    """A tidy ioi_locate-like table: FLDD of attn_out, mlp_out, resid_post per layer, and heads."""
    rows = []
    for layer in range(n_layers):
        for site, values in (("attn_out", attn), ("mlp_out", {}), ("resid_post", resid)):
            for metric, v in (("fldd", values.get(layer, 0.01)), ("iia", 0.0)):
                rows.append(
                    {
                        "site": site,
                        "layer": layer,
                        "head": -1,
                        "metric": metric,
                        "value": v,
                        "split": "test",
                        "intervention": "full",
                    }
                )
    for (layer, h), v in (heads or {}).items():
        rows.append(
            {
                "site": "z",
                "layer": layer,
                "head": h,
                "metric": "fldd",
                "value": v,
                "split": "test",
                "intervention": "full",
            }
        )
    return pd.DataFrame(rows)


# ----- the landmark rule -----


def test_signal_written_in_block_8_and_read_from_9_gives_8():
    # GPT-2-like: S-inhibition heads in 7 and 8 write it, the residual carries it to 8, the name
    # movers (9, 10) read it; their own outputs move LD little, one name mover a bit
    df = locate_table(
        attn={7: 0.35, 8: 0.7, 9: 0.03},
        resid={7: 0.4, 8: 1.2, 9: 0.1},
        heads={(8, 6): 0.4, (9, 9): 0.08, (10, 0): 0.06, (11, 3): 0.01},
    )
    lm = lmk.find_landmarks(df)
    assert (lm.mlp_in_the_middle, lm.handover_layer) == (8, 8)
    assert lm.name_movers == [[9, 9], [10, 0]]  # after block 8, above 0.05, largest first
    assert lmk.signal_range(df) == (7, 8)


def test_threshold_is_a_parameter_and_late_direct_attention_is_not_a_writer():
    df = locate_table(
        attn={19: 0.18, 20: 0.78, 22: 0.15, 25: 0.3},
        resid={19: 0.18, 20: 1.03, 21: 1.0, 22: 1.0},
        n_layers=30,
    )
    # attn_out 25 moves LD but the residual after it no longer carries the signal: not a writer
    assert lmk.find_landmarks(df).mlp_in_the_middle == 20
    assert lmk.find_landmarks(df, threshold=0.1).mlp_in_the_middle == 22  # 0.15 counts now
    assert lmk.find_landmarks(df, threshold=0.8) is None  # 0.78 < 0.8
    assert lmk.signal_range(df, 0.1) == (19, 22)
    assert lmk.signal_range(df) == (20, 22)


def test_no_block_above_threshold_gives_none_and_a_clear_yaml():
    df = locate_table(attn={}, resid={})
    assert lmk.find_landmarks(df) is None
    assert lmk.signal_range(df) is None
    assert "no block" in lmk.landmarks_line(None, 0.2)
    assert "landmarks: null" in lmk.landmarks_yaml(None, 0.2, "m")


def test_not_a_locate_table_is_refused():
    with pytest.raises(ValueError, match="not an ioi_locate table"):
        lmk.find_landmarks(locate_table({}, {}).query("site != 'attn_out'"))


def test_landmarks_yaml_is_a_model_config_block():
    from omegaconf import OmegaConf

    df = locate_table(attn={8: 0.7}, resid={8: 1.2}, heads={(9, 9): 0.1})
    got = OmegaConf.create(lmk.landmarks_yaml(lmk.find_landmarks(df), 0.2, "gpt2-small"))
    assert dict(got.landmarks) == {
        "handover_layer": 8,
        "mlp_in_the_middle": 8,
        "name_movers": [[9, 9]],
    }


# ----- config and layer choice -----


def test_config_composes_for_every_model():
    from omegaconf import OmegaConf

    for model in ("tiny", "smollm2-135m", "gpt2-small", "hf", "gguf"):
        cfg = compose(["experiment=ioi_layer_profile", f"model={model}"])
        assert cfg.runner == "ioi_layer_profile" and cfg.method.name == "das"
        assert cfg.extra.layers is None and cfg.extra.window == 2
        assert cfg.method.epochs == 30 and cfg.extra.signal_threshold == 0.2
        OmegaConf.to_container(cfg.extra, resolve=True)  # every interpolation resolves
    assert compose(["experiment=ioi_layer_profile", "extra.layers=[1,2]"]).extra.layers == [1, 2]


def test_layers_default_to_landmarks_plus_window_and_follow_options(tmp_path):
    def layers(*overrides, n=30, locate=None):
        cfg = compose(["experiment=ioi_layer_profile", "model=smollm2-135m", *overrides])
        return profile_layers(cfg, n, locate)[0]

    assert layers() == [18, 19, 20, 21, 22]  # landmarks 20 ± 2
    assert layers("extra.window=0") == [20]
    assert layers("extra.layers=[22,18,18]") == [18, 22]
    assert layers("extra.first_layer=17") == [17, 18, 19, 20, 21, 22]
    assert layers("extra.first_layer=2", "extra.last_layer=4") == [2, 3, 4]
    assert layers("extra.window=40", n=30) == list(range(30))  # clipped to the model
    df = locate_table(attn={19: 0.18, 20: 0.78}, resid={19: 0.18, 20: 1.0, 22: 1.0}, n_layers=30)
    df.to_csv(tmp_path / C.METRICS, index=False)
    assert layers(locate=read_locate(str(tmp_path))) == list(range(18, 25))  # 20..22 ± 2
    with pytest.raises(ConfigError, match="outside|within"):
        layers("extra.layers=[30]")
    hf = compose(["experiment=ioi_layer_profile", "model=hf", "model.path=/x"])
    with pytest.raises(ConfigError, match="no landmarks"):
        profile_layers(hf, 12, None)
    given = compose(
        [
            "experiment=ioi_layer_profile",
            "model=hf",
            "model.path=/x",
            "extra.first_layer=3",
            "extra.last_layer=5",
        ]
    )
    assert profile_layers(given, 12, None)[0] == [3, 4, 5]  # no landmarks needed


def test_unknown_or_ignored_options_are_refused_before_the_model_loads(tmp_path):
    from mlpim.preflight import preflight

    cfg = compose(["experiment=ioi_layer_profile", *TINY])
    with pytest.raises(MlpimError, match="ignores site.layer"):
        preflight(cfg, ["site.layer=1"])
    with pytest.raises(ConfigError, match="no ioi_locate"):
        read_locate(str(tmp_path / "nowhere"))


# ----- the engine helper -----


def test_prepare_many_equals_one_site_at_a_time(tiny_llama):
    cfg = compose(["model=tiny", "model.arch=llama", "device=cpu"])
    combos = [("ABB", "BAB"), ("BAB", "ABB")]
    batches = make_pairs(tiny_llama.tokenizer, cfg.dataset, "test", combos, 6, 0)
    sites = [("mlp_post", 0), ("resid_post", 0), ("mlp_post", 2), ("resid_post", 1)]
    many = prepare_many(tiny_llama, batches, sites)
    for kind, layer in sites:
        one = prepare(tiny_llama, batches, kind, layer)
        for a, b in zip(many[(kind, layer)], one, strict=True):
            assert a.engine == b.engine == "kernel"
            assert torch.equal(a.base_act, b.base_act) and torch.equal(a.source_act, b.source_act)
            assert torch.equal(a.clean_logits, b.clean_logits)
            assert a.state.keys.keys() == b.state.keys.keys()
            assert all(torch.equal(a.state.keys[i], b.state.keys[i]) for i in a.state.keys)
    # block 2's cached keys are one tensor for every site that runs block 2
    first = [many[s][0].state.keys[2] for s in sites if 2 in many[s][0].state.keys]
    assert len(first) == 3 and all(t is first[0] for t in first)
    logits = [many[s][0].clean_logits for s in sites]
    assert all(t is logits[0] for t in logits) and logits[0]._base is None  # one compact copy


def test_null_fraction_of_row_and_null_directions():
    torch.manual_seed(0)
    w_out = torch.randn(8, 3)  # rank 3 in 8 hidden dims
    q = torch.linalg.qr(w_out)[0]
    row = q[:, :1]
    null = torch.linalg.qr(torch.cat([q, torch.randn(8, 1)], 1))[0][:, 3:]
    assert null_fraction(row, w_out)[0] == pytest.approx(0.0, abs=1e-6)
    assert null_fraction(null, w_out)[0] == pytest.approx(1.0, abs=1e-6)
    mixed = (row + null) / 2**0.5
    frac, chance = null_fraction(mixed, w_out)
    assert frac == pytest.approx(0.5, abs=1e-6) and chance == pytest.approx(5 / 8)


# ----- end to end -----


KEYS = ["intervention", "site", "layer", "split", "metric"]


def test_profile_equals_single_layer_runs(tmp_path):
    cfg = compose(["experiment=ioi_layer_profile", *TINY, "extra.layers=[0,1]"])
    prof = run(cfg, tmp_path / "profile")
    assert (tmp_path / "profile" / "layer_profile.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "profile" / "directions").iterdir()) == [
        "mlp_post_L0.pt",
        "mlp_post_L1.pt",
        "resid_post_L0.pt",
        "resid_post_L1.pt",
    ]
    assert set(prof.layer) == {0, 1} and set(prof.site) == {"mlp_post", "resid_post"}
    null = prof[prof.metric == "null_frac"].value
    assert len(null) == 2 and null.between(0, 1).all()
    singles = []
    for exp, layer in (("ioi_mlp8_das", 1), ("ioi_resid8_das", 0)):
        single = compose([f"experiment={exp}", *TINY, f"site.layer={layer}"])
        run(single, tmp_path / f"{exp}_{layer}")
        singles.append(pd.read_csv(tmp_path / f"{exp}_{layer}" / C.METRICS))
    ours = pd.read_csv(tmp_path / "profile" / C.METRICS)
    merged = pd.concat(singles).merge(ours, on=KEYS, suffixes=("_single", "_profile"))
    assert len(merged) == sum(len(s) for s in singles)  # every single-run row has its twin
    assert {"das", "full", "clean"} <= set(merged.intervention)
    diff = (merged.value_single - merged.value_profile).abs().max()
    assert diff <= 1e-6, merged[(merged.value_single - merged.value_profile).abs() > 1e-6]
    das = merged[(merged.intervention == "das") & (merged.metric == "fldd")]
    assert das.value_profile.abs().max() > 0  # the DAS patch did something to compare
    summary = (tmp_path / "profile" / C.SUMMARY).read_text()
    assert "v_MLP fldd" in summary and "layers from extra.layers" in summary


def test_ioi_locate_writes_the_landmarks_the_rule_gives(tmp_path, caplog):
    from omegaconf import OmegaConf

    cfg = compose(
        [
            "experiment=ioi_locate",
            "model=tiny",
            "device=cpu",
            "extra.n_pairs_per_direction=4",
            "++extra.signal_threshold=-1.0",
        ]
    )
    with caplog.at_level("INFO"):
        run(cfg, tmp_path)
    df = pd.read_csv(tmp_path / C.METRICS)
    lm = lmk.find_landmarks(df, -1.0)  # a random model's FLDDs are ~0: let every block qualify
    assert lm is not None and lm.mlp_in_the_middle == 2  # the last of the tiny model's 3 blocks
    got = OmegaConf.load(tmp_path / "landmarks.yaml").landmarks
    assert (got.mlp_in_the_middle, got.handover_layer) == (lm.mlp_in_the_middle, lm.handover_layer)
    assert f"mlp_in_the_middle={lm.mlp_in_the_middle}" in caplog.text
