"""Directions saved by other tools (pyvene, SAELens, causalab, plain tensor files), read into a
`ForeignDirection` without running code from the file, and checked against a model.

`read_direction(path, **options)` tells the format from the contents (`sniff`, whose one
sniffer `file_kind` says what any file is) and reads it;
`check_fits(record, sizes_of(model), compat)` refuses, in one line, a direction that does not
fit the model. Each format's reader documents the layout it reads and where it was found.
"""

from mlpim.engine.readers.pyvene_folder import read_pyvene
from mlpim.engine.readers.record import (
    REQUIREMENTS,
    SITES,
    ForeignDirection,
    ModelSizes,
    check_fits,
    sizes_of,
)
from mlpim.engine.readers.saelens_folder import read_saelens, tl_hook_site
from mlpim.engine.readers.sniff import (
    CORRUPT,
    FORMATS,
    KINDS,
    file_kind,
    read_direction,
    sniff,
)
from mlpim.engine.readers.tensor_files import load_npy, load_torch, read_tensor_file

__all__ = [
    "CORRUPT",
    "FORMATS",
    "KINDS",
    "REQUIREMENTS",
    "SITES",
    "ForeignDirection",
    "ModelSizes",
    "check_fits",
    "file_kind",
    "load_npy",
    "load_torch",
    "read_direction",
    "read_pyvene",
    "read_saelens",
    "read_tensor_file",
    "sizes_of",
    "sniff",
    "tl_hook_site",
]
