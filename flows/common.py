"""Helpers shared by the flows: config loading, artifact keys, and quiet logs for user errors."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from l3m.config import RunConfig, load_config
from l3m.data.loading import LoadedDomain, load_domain
from l3m.data.snapshot import load_snapshot

# The loggers Prefect's engines log a failed flow/task run on, with the traceback (exc_info).
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


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


class UserErrorTracebackFilter(logging.Filter):
    """Drop the traceback from a run-failure record whose exception is a user error.

    Prefect logs every failed flow and task run with ``exc_info``, so a typo in a config printed a
    traceback before the CLI's own clean message. For the user-error types the record becomes one
    line (type and the message's first line); any other exception keeps its traceback.
    """

    def __init__(self, user_errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.user_errors = user_errors

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.user_errors):
            first_line = (str(exc).splitlines() or [""])[0]
            record.msg, record.args = "%s: %s (run with --debug for the traceback)", (type(exc).__name__, first_line)
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks(user_errors: tuple[type[BaseException], ...]) -> UserErrorTracebackFilter:
    """Install the filter on Prefect's run loggers (idempotent); returns it so a caller can remove it."""
    flt = UserErrorTracebackFilter(user_errors)
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, UserErrorTracebackFilter)]:
            logger.removeFilter(old)
        logger.addFilter(flt)
    return flt
