"""Tell a direction file's format from its contents (never its name), and read it.

Formats: `pyvene` (folder: config.json with representations + intkey_*.bin), `saelens` (folder:
cfg.json + sae_weights.safetensors), `causalab` (rotation.safetensors holding rotation_matrix,
or its folder), `safetensors`, `npy`, `npz`, `torch` (a torch.save zip or legacy file) and
`mlpim` (a torch file holding a dict with `basis`). Anything else is refused in one line that
says what was found; a file cut short (a zip without its directory, a safetensors file holding
less than its header says) is named truncated or corrupt. Sniffing reads headers only, except
that a torch file is loaded with `weights_only=True` to tell mlpim's subspace from a plain
tensor. `file_kind` is the one sniffer: what any file is (`KINDS`, readable or not), from its
first bytes.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from mlpim.engine.readers.pyvene_folder import read_pyvene
from mlpim.engine.readers.record import ForeignDirection
from mlpim.engine.readers.saelens_folder import CFG, WEIGHTS, read_saelens
from mlpim.engine.readers.tensor_files import CAUSALAB_KEY, load_torch, read_tensor_file
from mlpim.errors import MlpimError

FORMATS = ("pyvene", "saelens", "causalab", "safetensors", "npy", "npz", "torch", "mlpim")
CAUSALAB_FILE = "rotation.safetensors"
MAX_HEADER = 100_000_000  # the largest header the safetensors library reads
# The options each format takes; any other option given is refused rather than ignored.
OPTIONS = {
    "pyvene": {"key", "columns", "site", "layer", "gated_mlp"},
    "saelens": {"feature", "site", "layer"},
    "causalab": {"key", "columns", "site", "layer"},
    "safetensors": {"key", "columns", "rows", "site", "layer"},
    "npy": {"columns", "rows", "site", "layer"},
    "npz": {"key", "columns", "rows", "site", "layer"},
    "torch": {"key", "columns", "rows", "site", "layer"},
    "mlpim": {"columns", "site", "layer"},
}


def _json(path: Path) -> dict | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _json_problem(path: Path) -> str | None:
    """Why the JSON file at `path` cannot be read (its line and column), None if it can."""
    try:
        json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        return f"{path} is not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})"
    except json.JSONDecodeError as e:
        return f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
    return None


def _folder_format(path: Path) -> str:
    """pyvene, saelens or causalab, from the files a folder holds."""
    config = _json(path / "config.json") if (path / "config.json").is_file() else None
    if config is not None and {"representations", "intervention_types"} <= config.keys():
        return "pyvene"
    if (path / CFG).is_file() or (path / WEIGHTS).is_file():
        return "saelens"
    if (path / CAUSALAB_FILE).is_file():
        return "causalab"
    if (path / "config.json").is_file() and (problem := _json_problem(path / "config.json")):
        raise MlpimError(f"{problem}: cut short or edited? save the folder again")
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
    raise MlpimError(
        f"{path}: a folder mlpim cannot read as a direction: it holds {shown or 'nothing'}; "
        f"expected pyvene (config.json + intkey_*.bin), SAELens ({CFG} + {WEIGHTS}) "
        f"or causalab ({CAUSALAB_FILE})"
    )


def _safetensors_kind(head: bytes, size: int) -> str | None:
    """safetensors or causalab from a safetensors header (`head`: the file's first bytes, `size`:
    its length); corrupt_safetensors for a header that is no JSON or says more data than the file
    holds; None if `head` does not start a safetensors file."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n = int.from_bytes(head[:8], "little")
    if not 2 <= n <= MAX_HEADER:
        return None
    if n > len(head) - 8 and n <= size - 8:
        return None
    try:
        header = json.loads(head[8 : 8 + n])
    except ValueError:
        return "corrupt_safetensors"
    if not isinstance(header, dict):
        return "corrupt_safetensors"
    offsets = [v.get("data_offsets") for v in header.values() if isinstance(v, dict)]
    ends = [o[1] for o in offsets if isinstance(o, list) and len(o) == 2 and isinstance(o[1], int)]
    if 8 + n + max(ends, default=0) > size:
        return "corrupt_safetensors"
    return "causalab" if CAUSALAB_KEY in header else "safetensors"


def _zip_format(path: Path) -> str | None:
    """torch (a torch.save zip holding data.pkl), npz (a zip of .npy arrays) or corrupt_zip."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return "corrupt_zip"  # a zip's directory is at its end: cut short, or damaged
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    return "npz" if all(n.endswith(".npy") for n in names) else None  # np.savez() of none too


def _describe_bytes(head: bytes) -> str:
    """What the first bytes of an unknown file look like, for the refusal."""
    if head[:1] == b"\x80":
        return "a Python pickle (mlpim does not unpickle files: that can run code)"
    try:
        text = head[:4096].decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end still counts
        text = head[: e.start].decode("utf-8") if e.start > 4090 else None
    if text and "\x00" not in text:
        return f"a text file starting {text.strip()[:30]!r}"
    return f"unknown content starting {head[:8]!r}"


KINDS = {
    "npy": "a numpy .npy file",
    "npz": "a numpy .npz archive",
    "safetensors": "a safetensors file",
    "causalab": "a causalab rotation (safetensors)",
    "torch": "a torch file",
    "pickle": "a Python pickle",
    "zip": "a zip archive (not a torch file)",
    "gguf": "a GGUF model file",
    "text": "a text file",
    "empty": "an empty file",
    "binary": "a binary file of unknown format",
    "corrupt_zip": "a truncated or corrupt zip archive (the container of torch .pt and numpy "
    ".npz files): its central directory is missing",
    "corrupt_safetensors": "a truncated or corrupt safetensors file: it holds less than its "
    "header says",
}
CORRUPT = ("corrupt_zip", "corrupt_safetensors")  # kinds of a file cut short or damaged
TORCH_LEGACY = b"\x80\x02\x8a"  # torch's legacy format: a pickled magic number first


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(1 << 20)


def _kind(path: Path, head: bytes) -> str:
    """What a file is from its leading bytes `head` (a key of KINDS)."""
    if not head:
        return "empty"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if (kind := _safetensors_kind(head, path.stat().st_size)) is not None:
        return kind
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip (PK 05 06: an empty one)
        return _zip_format(path) or "zip"
    if head[:1] == b"\x80":
        return "torch" if head.startswith(TORCH_LEGACY) else "pickle"
    if head.startswith(b"GGUF"):
        return "gguf"
    try:
        head[:512].decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    return "text"


def file_kind(path: str | Path) -> str:
    """What a file is, from its content (a key of `KINDS`), whatever its name: the one sniffer."""
    return _kind(Path(path), _head(Path(path)))


def _file_format(path: Path) -> str:
    """npy, safetensors, causalab, torch, mlpim or npz, from a file's leading bytes."""
    head = _head(path)
    kind = _kind(path, head)
    if kind == "torch":
        return "mlpim" if _is_mlpim(path) else kind
    if kind in FORMATS:
        return kind
    if kind in CORRUPT:
        raise MlpimError(f"{path}: {KINDS[kind]}; save or copy it again")
    raise MlpimError(f"{path}: not a direction file mlpim reads: {_describe_bytes(head)}")


def _is_mlpim(path: Path) -> bool:
    loaded = load_torch(path, "torch")
    return isinstance(loaded, dict) and "basis" in loaded


def sniff(path: str | Path) -> str:
    """The format of a direction file or folder (one of FORMATS), from its contents."""
    path = Path(path)
    if path.is_dir():
        return _folder_format(path)
    if path.is_file():
        return _file_format(path)
    raise MlpimError(f"{path}: no such file or folder")


def read_direction(
    path: str | Path, fmt: str | None = None, loaded=None, **options
) -> ForeignDirection:
    """The direction saved at `path` in any format mlpim reads, with the format's options
    (key, feature, columns, rows, site, layer, gated_mlp); an option it does not take is refused.
    `fmt` (else sniffed) and `loaded` (a .npy or torch file's content) spare reading it again."""
    path = Path(path)
    fmt = fmt or sniff(path)
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - OPTIONS[fmt])
    if extra:
        takes = ", ".join(f"direction_{o}" for o in sorted(OPTIONS[fmt]))
        named = ", ".join(f"direction_{o}" for o in extra)
        raise MlpimError(f"{path} is a {fmt} direction: {named} not for it (takes {takes})")
    if fmt == "pyvene":
        return read_pyvene(path, **given)
    if fmt == "saelens":
        return read_saelens(path, **given)
    if fmt == "causalab" and path.is_dir():
        path = path / CAUSALAB_FILE
    return read_tensor_file(path, fmt, loaded, **given)
