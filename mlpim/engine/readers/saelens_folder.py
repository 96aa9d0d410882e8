"""Read SAE feature directions from a folder saved by SAELens (`SAE.save_model`).

Layout (SAELens 6, sae_lens/saes/sae.py `save_model`, sae_lens/constants.py):

- `cfg.json`: `SAEConfig.to_dict()`: `d_in`, `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`,
  `normalize_activations`, `reshape_activations` ("hook_z" for attention-z SAEs),
  `architecture`, and `metadata` {`model_name`, `hook_name`, `hook_head_index`, `prepend_bos`,
  `sae_lens_version`, `model_from_pretrained_kwargs`, ...}. Before 6.0 the metadata fields sat
  at the top level (`hook_name`, `hook_layer`, `hook_head_index`, `model_name`); older still,
  `hook_point` / `hook_point_head_index` (sae_lens/loading/pretrained_sae_loaders.py
  `handle_pre_6_0_config`). Transcoders add `d_out`: their decoder writes another site.
- `sae_weights.safetensors`: `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `b_enc`, `b_dec`
  (+ `threshold` for JumpReLU). A feature's direction is its row of `W_dec`.

The hook name is a TransformerLens name; mlpim's sites are TransformerLens hooks, so the
mapping is by name (TransformerBridge aliases such as `blocks.L.hook_out` are accepted too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from mlpim.engine.readers.record import ForeignDirection, agree, orthonormal_basis, pick
from mlpim.errors import MlpimError

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
HOOK_SITES = {
    "hook_resid_pre": "resid_pre",
    "hook_in": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_out": "resid_post",
    "hook_attn_out": "attn_out",
    "attn.hook_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "mlp.hook_out": "mlp_out",
    "mlp.hook_post": "mlp_post",
    "attn.hook_z": "z",
}
HOOK_REFUSED = {
    "mlp.hook_pre": "the MLP's pre-activation",
    "hook_mlp_in": "the MLP's input",
    "hook_attn_in": "the attention's input",
    "ln1.hook_normalized": "a layer-normed input",
    "ln2.hook_normalized": "a layer-normed input",
    "attn.hook_result": "per-head outputs",
    "attn.hook_q": "per-head queries",
    "attn.hook_k": "per-head keys",
    "attn.hook_v": "per-head values",
    "attn.hook_pattern": "attention probabilities",
}


def tl_hook_site(hook: str, what: str) -> tuple[str, int]:
    """(mlpim site, layer) of a TransformerLens hook name like `blocks.8.hook_resid_pre`."""
    found = re.fullmatch(r"blocks\.(\d+)\.(.+)", str(hook).strip())
    if found is None:
        raise MlpimError(f"{what}: hook {hook!r} is not a blocks.<layer>.<hook> name mlpim maps")
    layer, name = int(found.group(1)), found.group(2)
    if name in HOOK_REFUSED:
        raise MlpimError(f"{what}: hook {hook!r} ({HOOK_REFUSED[name]}) has no mlpim site")
    if name not in HOOK_SITES:
        known = ", ".join(f"blocks.L.{h}" for h in HOOK_SITES)
        raise MlpimError(f"{what}: unknown hook {hook!r}; mlpim maps {known}")
    return HOOK_SITES[name], layer


def _cfg(folder: Path) -> dict:
    """cfg.json with the SAELens 6 metadata fields merged over the pre-6 top-level ones."""
    try:
        cfg = json.loads((folder / CFG).read_text())
    except (OSError, ValueError) as e:
        raise MlpimError(f"{folder}: cannot read {CFG} as JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise MlpimError(f"{folder}/{CFG} is not a JSON object")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    renamed = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
    flat = {renamed.get(k, k): v for k, v in cfg.items() if k != "metadata"}
    return {**flat, **{k: v for k, v in meta.items() if v is not None}}


def _sizes(cfg: dict, what: str) -> tuple[int, int, str]:
    """(d_in, d_sae, hook name) of an SAE config; refuses what mlpim cannot place."""
    missing = [k for k in ("d_in", "d_sae", "hook_name") if cfg.get(k) is None]
    if missing:
        raise MlpimError(f"{what}/{CFG} lacks {', '.join(missing)}: not a SAELens SAE config")
    if cfg.get("d_out") is not None or cfg.get("hook_name_out") is not None:
        raise MlpimError(f"{what}: a transcoder (its decoder writes another site), not an SAE")
    if cfg.get("hook_head_index") is not None:
        head = cfg["hook_head_index"]
        raise MlpimError(f"{what}: an SAE on head {head} alone; mlpim reads whole-site SAEs")
    return int(cfg["d_in"]), int(cfg["d_sae"]), str(cfg["hook_name"])


def processing_requires(cfg: dict) -> tuple[frozenset[str], str]:
    """What the SAE's activations need from the model at a residual site, and a note: SAELens
    records TransformerLens's `from_pretrained` kwargs; its training runner sets
    center_writing_weights=False (raw residuals), TransformerLens's own default is True."""
    kwargs = cfg.get("model_from_pretrained_kwargs")
    if not isinstance(kwargs, dict):
        return frozenset({"stated_processing"}), "processing not recorded"
    centred = bool(kwargs.get("center_writing_weights", True))
    need = "centred_activations" if centred else "raw_activations"
    return frozenset({need}), f"center_writing_weights={centred}"


def _rows(folder: Path, features: list[int] | None, d_in: int, d_sae: int) -> torch.Tensor:
    """The chosen rows of W_dec, read without loading the rest of the file."""
    path = folder / WEIGHTS
    if not path.is_file():
        raise MlpimError(f"{folder}: no {WEIGHTS} (SAELens saves W_dec there)")
    with safe_open(str(path), framework="pt") as f:
        if "W_dec" not in f.keys():
            raise MlpimError(f"{path}: no W_dec; it holds {', '.join(sorted(f.keys()))}")
        sliced = f.get_slice("W_dec")
        shape = tuple(sliced.get_shape())
        if shape != (d_sae, d_in):
            want = f"[d_sae, d_in] = [{d_sae}, {d_in}]"
            raise MlpimError(f"{path}: W_dec is {list(shape)}, but {CFG} says {want}")
        if features is None:
            choose = f"choose one with direction_feature=N (0..{d_sae - 1})"
            raise MlpimError(f"{folder}: an SAE with {d_sae} features; {choose}")
        return torch.stack([sliced[i : i + 1][0] for i in features])


def read_saelens(
    folder: str | Path,
    feature: int | list[int] | None = None,
    site: str | None = None,
    layer: int | None = None,
) -> ForeignDirection:
    """The decoder direction of `feature` (a list spans a subspace) of a SAELens folder."""
    folder = Path(folder)
    what = str(folder)
    cfg = _cfg(folder)
    d_in, d_sae, hook = _sizes(cfg, what)
    features = pick(feature, d_sae, f"{what}: direction_feature")
    rows = _rows(folder, features, d_in, d_sae)
    found_site, found_layer = tl_hook_site(hook, what)
    if cfg.get("hook_layer") is not None and int(cfg["hook_layer"]) != found_layer:
        raise MlpimError(f"{what}: hook_layer {cfg['hook_layer']} but hook {hook!r}")
    norms = ", ".join(f"{float(n):.3g}" for n in rows.float().norm(dim=1))
    arch, norm = cfg.get("architecture", "?"), cfg.get("normalize_activations", "?")
    requires, processing = processing_requires(cfg)
    note = f"W_dec rows {features} (norms {norms}), normalised; {arch} SAE, normalize {norm}"
    note += f"; {processing}"
    return ForeignDirection(
        basis=orthonormal_basis(rows.T, f"{what}: W_dec rows {features}"),
        site=agree(found_site, site, "site", what),
        layer=agree(found_layer, layer, "layer", what),
        fmt="saelens",
        kind=f"SAE feature {features[0]}" if len(features) == 1 else f"SAE features {features}",
        origin=hook,
        note=note,
        path=str(folder),
        requires=requires,
    )
