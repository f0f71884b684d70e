"""Prefect flow ``validate``: Great Expectations checks on a domain; bad data stops the run.

Data that passes becomes the validated snapshot (``l3m.data.snapshot``) every later step reads.
The snapshot is content-addressed (raw file bytes + domain config + data code), so an unchanged
rerun finds it and skips validation; changed data or settings validate anew. The report is
addressed the same way (``validation/<snapshot name>/``), so a skipped validation links the
report of its own snapshot, never the last one written (which may be another run's failure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.common import artifact_key, as_config
from l3m.config import RunConfig
from l3m.data.loading import prepare, read_raw
from l3m.data.remote import forget_downloads
from l3m.data.report import to_markdown, write_report
from l3m.data.snapshot import find_snapshot, read_manifest, snapshot_dir, write_snapshot
from l3m.data.validation import DataValidationError, ValidationReport, validate_domain
from l3m.scoring.keys import hub_commit


def report_dir(cfg: RunConfig) -> Path:
    """Where the validation report of ``cfg``'s data goes: named like its snapshot (which exists
    only if the data passed), so every version of the data keeps its own report."""
    return cfg.resolved_output_dir() / "validation" / snapshot_dir(cfg).name


def validate_and_report(cfg: RunConfig) -> tuple[ValidationReport, dict[str, Path]]:
    """Read, validate and write the report files; if the data passes, write its snapshot too.

    Shared by the task and `l3m validate --no-prefect`. ``paths["snapshot"]`` is set on success.
    """
    raw = read_raw(cfg.domain)  # DataError (missing file, bad line, wrong field) fails here, clearly
    prepared = prepare(cfg.domain, raw)
    report = validate_domain(cfg.domain, raw, prepared)
    paths = write_report(report, report_dir(cfg))
    if report.passed:
        summary = {"passed": True, "warnings": len(report.warnings), "report": str(paths["json"]),
                   "row_counts": report.row_counts, "split_status": report.split_status,
                   "checks": [{"check": r.check, "split": r.split, "severity": r.severity, "success": r.success,
                               "rows": r.unexpected_count} for r in report.final]}
        paths["snapshot"] = write_snapshot(snapshot_dir(cfg), cfg.domain, prepared, summary)
    return report, paths


@task(name="validate-domain", cache_policy=NONE)
def validate_task(cfg: RunConfig) -> dict[str, Any]:
    logger = get_run_logger()
    forget_downloads()  # URL splits: this validation hashes and reads their current content
    hub_commit.cache_clear()  # a hub model: this run keys its scores and runs by main's commit now
    existing = find_snapshot(cfg)
    if existing is not None:
        manifest = read_manifest(existing)
        logger.info("data unchanged since snapshot %s (validated %s): validation skipped",
                    existing.name, manifest["created"])
        return {"passed": True, "cached": True, "snapshot": str(existing), "fingerprint": manifest["fingerprint"],
                "warnings": manifest["validation"].get("warnings", 0), "report": manifest["validation"].get("report")}
    report, paths = validate_and_report(cfg)
    create_markdown_artifact(markdown=to_markdown(report), key=artifact_key("validation", cfg.domain.name),
                             description=f"Data validation of {cfg.domain.name}")
    for w in report.warnings:
        logger.warning("[%s] %s: %s (%d rows) %s", w.split, w.check, w.description, w.unexpected_count, w.detail)
    logger.info("validation report: %s", paths["html"])
    if not report.passed:
        raise DataValidationError(report)
    manifest = read_manifest(paths["snapshot"])
    logger.info("validated data snapshot: %s (fingerprint %s)", paths["snapshot"], manifest["fingerprint"])
    return {"passed": True, "cached": False, "snapshot": str(paths["snapshot"]), "fingerprint": manifest["fingerprint"],
            "errors": 0, "warnings": len(report.warnings),
            "report": str(paths["markdown"]), "html": str(paths["html"]), "json": str(paths["json"])}


@flow(name="validate")
def validate(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Validate the domain of a run config (a YAML path); raise if an error-level check fails."""
    cfg = as_config(Path(config), overrides)
    return validate_task(cfg)
