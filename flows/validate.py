"""Prefect flow ``validate``: Great Expectations checks on a domain; bad data stops the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key, as_config
from l3m.config import RunConfig
from l3m.data.loading import read_raw
from l3m.data.report import to_markdown, write_report
from l3m.data.validation import DataValidationError, ValidationReport, validate_domain


def validate_and_report(cfg: RunConfig) -> tuple[ValidationReport, dict[str, Path]]:
    """Read, validate and write the report files; shared by the task and `l3m validate --no-prefect`."""
    raw = read_raw(cfg.domain)  # DataError (missing file, bad line, wrong field) fails here, clearly
    report = validate_domain(cfg.domain, raw)
    return report, write_report(report, cfg.resolved_output_dir() / "validation")


@task(name="validate-domain")
def validate_task(cfg: RunConfig) -> dict[str, Any]:
    logger = get_run_logger()
    report, paths = validate_and_report(cfg)
    md = to_markdown(report)
    create_markdown_artifact(markdown=md, key=artifact_key("validation", cfg.domain.name),
                             description=f"Data validation of {cfg.domain.name}")
    for w in report.warnings:
        logger.warning("[%s] %s: %s (%d rows) %s", w.split, w.check, w.description, w.unexpected_count, w.detail)
    logger.info("validation report: %s", paths["html"])
    if not report.passed:
        raise DataValidationError(report)
    return {"passed": True, "errors": 0, "warnings": len(report.warnings),
            "report": str(paths["markdown"]), "html": str(paths["html"]), "json": str(paths["json"])}


@flow(name="validate")
def validate(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Validate the domain of a run config (a YAML path); raise if an error-level check fails."""
    cfg = as_config(Path(config), overrides)
    return validate_task(cfg)
