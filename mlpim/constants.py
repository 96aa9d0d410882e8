"""Artifact file names in a run directory, and the metric/intervention vocabulary."""

RESOLVED_CONFIG = "config.yaml"
METRICS = "metrics.csv"
SUMMARY = "summary.md"
VERDICT = "verdict.md"  # illusion_check: the verdict table and what each check measured
HISTORY = "history.csv"
LOG = "run.log"
DONE = "DONE"  # written last: a run directory holding it is finished and is never re-run
DIRECTION = "subspace.pt"
COLLECTED = "collected.csv"

METRIC_COLUMNS = [
    "model",
    "experiment",
    "intervention",
    "site",
    "layer",
    "split",
    "metric",
    "value",
]
METRIC_NAMES = ("logit_diff", "accuracy", "iia", "fldd", "flip_rate")
