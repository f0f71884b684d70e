"""Helpers shared by the flows: config loading and artifact keys."""

from __future__ import annotations

import re
from pathlib import Path

from l3m.config import RunConfig, load_config
from l3m.data.loading import LoadedDomain, load_domain
from l3m.data.snapshot import load_snapshot


def as_config(config: str | Path | RunConfig | dict, overrides: list[str] | None = None) -> RunConfig:
    """Flows accept a YAML path (deployments, CLI), a dict (Prefect UI form) or a RunConfig."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return RunConfig.model_validate(config)
    return load_config(config, overrides)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def load_data(cfg: RunConfig, snapshot: str | None) -> LoadedDomain:
    """The validated snapshot's data (the hand-off between steps); the raw sources only when a
    caller passes none (library use without the validate step)."""
    if snapshot:
        return load_snapshot(snapshot)
    return load_domain(cfg.domain)
