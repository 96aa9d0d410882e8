"""Tidy metric rows: the one shape every result table of mlpim is built from."""

from __future__ import annotations


def metric_rows(values: dict[str, float], **keys) -> list[dict]:
    """{metric: value} -> tidy rows sharing `keys` (intervention, site, layer, split ...)."""
    return [{**keys, "metric": m, "value": v} for m, v in values.items()]
