"""TEMPORARY shim (issue 19): loading or training a DAS direction writes files, so it moved to
`mlpim.experiments.common` (`saved_or_trained`, `das_direction`, `das_basis`).

Only `experiments/ioi_alignment.py` and `experiments/illusion_benchmark.py` still import it from
here; at their merge they import from `mlpim.experiments.common` and this file is deleted
(tests/test_layers.py lists it as the one allowed upward import until then).
"""

from mlpim.experiments.common import das_basis, das_direction, saved_or_trained

__all__ = ["das_basis", "das_direction", "saved_or_trained"]
