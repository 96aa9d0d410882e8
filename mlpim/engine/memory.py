"""What a run holds in memory at its peak, estimated before the model loads (`mlpim.preflight`).

Plain sizes in, bytes out. The model's shape comes from a GGUF file's header or a Hugging Face
folder's safetensors headers and config.json (no tensor is read), else from the sizes a model
config declares. The estimate adds the weights in the model's dtype, the prepared pairs (each base
prompt's keys and values at every layer, its END logits and the site's activations of base and
source), one forward's full logits, the natural activations and the libraries loaded after
preflight. docs/engine.md ("Memory") says what each part stands for.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mlpim.errors import MlpimError

GIB = 1 << 30
MIB = 1 << 20
# transformers and TransformerLens, imported after preflight: a process's RSS went from 226 to
# 471 MiB when they were imported after torch (2026-12-07, the project's 2-core machine)
LIBRARIES = 245 * MIB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
UNITS |= {"kib": 1 << 10, "mib": MIB, "gib": GIB, "tib": 1 << 40}
UNITS |= {f"{u}b": v for u, v in UNITS.items() if len(u) == 1 and u != "b"}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a model that its memory depends on."""

    n_params: int
    n_layers: int
    d_model: int
    d_mlp: int
    vocab: int
    kv_width: int  # width of one layer's keys (n_kv_heads x d_head)


@dataclass(frozen=True)
class Workload:
    """What a run holds besides the weights."""

    n_pairs: int  # pairs prepared and held at once
    seq: int = 32  # tokens per prompt (IOI's longest prompts, with a prefix sentence)
    batch: int = 32  # prompts in one forward (the clean-answer predictor's batch)
    n_natural: int = 0  # prompts whose END site activations (d_mlp wide) are kept


def declared_shape(
    n_layers: int,
    d_model: int,
    d_mlp: int,
    vocab: int = 0,
    kv_width: int | None = None,
    gated: bool = True,
) -> ModelShape:
    """The shape of a decoder with these sizes: per layer, query and output d_model x d_model,
    keys and values d_model x kv_width (d_model when unknown), a gated (3) or plain (2) MLP of
    d_model x d_mlp; an embedding and an unembedding of vocab x d_model each (untied: an upper
    bound for a tied model; none when vocab is unknown)."""
    kv = kv_width or d_model
    per_layer = 2 * d_model * (d_model + kv) + (3 if gated else 2) * d_model * d_mlp
    n_params = n_layers * per_layer + 2 * vocab * d_model
    return ModelShape(n_params, n_layers, d_model, d_mlp, vocab, kv)


def estimate(shape: ModelShape, dtype_bytes: int, work: Workload) -> dict[str, int]:
    """Peak bytes of a run, by holder (their sum is the estimate)."""
    b, s = dtype_bytes, shape
    per_pair = s.n_layers * 2 * s.kv_width * work.seq + s.vocab + 2 * s.d_mlp
    return {
        "weights": s.n_params * b,
        "prepared pairs": work.n_pairs * per_pair * b,
        "one forward": work.batch * work.seq * (s.vocab + 4 * s.d_mlp) * b,
        "natural activations": work.n_natural * s.d_mlp * b,
        "libraries": LIBRARIES,
    }


def size_text(n: float) -> str:
    """Bytes as `1.9 GiB` (`512 MiB` below a GiB)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def parse_size(text: str, name: str) -> int:
    """`8GiB`, `512MiB`, `2GB`, `1e9` -> bytes; anything else is refused naming `name`."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if m and m.group(2) in UNITS:
        try:
            return int(float(m.group(1)) * UNITS[m.group(2)])
        except ValueError:
            pass
    raise MlpimError(f"{name}={text}: not a size; give one such as 8GiB, 512MiB or 2GB")


def free_bytes(device: str) -> int | None:
    """Memory free for a run on `device`: CUDA's free memory, or the RAM available to this
    process (MemAvailable, within a cgroup's limit); None where unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev.index or 0)[0]
    if dev.type != "cpu":
        return None
    free = [_meminfo_available(), _cgroup_free()]
    known = [f for f in free if f is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def _cgroup_free() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape (GGUF's order: fastest axis first) from a GGUF v2/v3 file's header;
    no tensor is read."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        at = 24
        for _ in range(n_kv):
            at = _skip(m, at, GGUF_STRING)  # the key
            at = _skip(m, at + 4, struct.unpack_from("<I", m, at)[0])
        shapes = {}
        for _ in range(n_tensors):
            (n,) = struct.unpack_from("<Q", m, at)
            name, at = bytes(m[at + 8 : at + 8 + n]).decode(), at + 8 + n
            (dims,) = struct.unpack_from("<I", m, at)
            shapes[name] = struct.unpack_from(f"<{dims}Q", m, at + 4)
            at += 4 + 8 * dims + 4 + 8  # dims, type, offset
    return shapes


def _skip(m: mmap.mmap, at: int, kind: int) -> int:
    """The offset after a GGUF value of type `kind` at `at`."""
    if kind == GGUF_STRING:
        return at + 8 + struct.unpack_from("<Q", m, at)[0]
    if kind != GGUF_ARRAY:
        return at + GGUF_SCALARS[kind]
    elem, count = struct.unpack_from("<IQ", m, at)
    at += 12
    if elem in GGUF_SCALARS:
        return at + count * GGUF_SCALARS[elem]
    for _ in range(count):
        at = _skip(m, at, elem)
    return at


def gguf_shape(path: Path) -> ModelShape | None:
    """The shape of the model in a GGUF file (llama.cpp's tensor names), None if unreadable."""
    try:
        t = gguf_tensors(path)
        d_model, vocab = t["token_embd.weight"]
        layers = {name.split(".")[1] for name in t if name.startswith("blk.")}
        d_mlp, kv = t["blk.0.ffn_down.weight"][0], t["blk.0.attn_k.weight"][1]
    except (OSError, ValueError, KeyError, IndexError, struct.error):
        return None
    n_params = sum(math.prod(s) for s in t.values())
    return ModelShape(n_params, len(layers), d_model, d_mlp, vocab, kv)


HF_KEYS = {  # ModelShape field -> config.json keys, first found wins
    "n_layers": ("num_hidden_layers", "n_layer"),
    "d_model": ("hidden_size", "n_embd"),
    "d_mlp": ("intermediate_size", "n_inner"),
    "vocab": ("vocab_size",),
}


def hf_shape(folder: Path) -> ModelShape | None:
    """The shape of a Hugging Face model folder: parameters counted from its safetensors
    headers, sizes from config.json; None without them."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        sizes = {k: next(config[n] for n in keys if config.get(n)) for k, keys in HF_KEYS.items()}
        n_params = sum(safetensors_params(f) for f in sorted(Path(folder).glob("*.safetensors")))
    except (OSError, ValueError, StopIteration, struct.error):
        return None
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    d_head = config.get("head_dim") or sizes["d_model"] // heads
    kv = (config.get("num_key_value_heads") or heads) * d_head
    return ModelShape(n_params, kv_width=kv, **sizes) if n_params else None


def safetensors_params(path: Path) -> int:
    """Number of parameters in a safetensors file, from its header (8-byte length, JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
