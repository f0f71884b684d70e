"""Data validation with Great Expectations: the raw splits, then the prepared rows, which decide.

The raw splits (and the raw unlabelled corpus) are validated first, so the report shows the data
as it is on disk; then the prepared domain (``l3m.data.loading.prepare``: cleaned as configured,
dev/test carved where missing) is validated, carved splits and the cleaned corpus included, and
*those* results decide the run. The checks themselves are in ``l3m.data.checks``; severities
and thresholds in ``ValidationSpec``; docs/validation.md describes both.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from l3m.config import DomainConfig
from l3m.data.checks import CHECKS, CheckResult, Runner, Source, check_corpus, check_split, severity
from l3m.data.columns import LABEL, SPLITS
from l3m.data.loading import PreparedDomain, RawDomain, label_names_for, prepare

__all__ = ["CHECKS", "CheckResult", "DataValidationError", "ValidationReport", "validate_domain", "validate_frames"]
CORPUS = "unlabelled"


@dataclass
class ValidationReport:
    domain: str
    sources: dict[str, str]
    raw: list[CheckResult]
    final: list[CheckResult]  # on the prepared data (cleaned, carved): these decide the run
    cleaning_notes: list[str]
    row_counts: dict[str, dict[str, int]]  # split (and "unlabelled") -> {"raw": n, "used": n}
    label_counts: dict[str, dict[str, int]]
    # dev/test: "standard" (the file as shipped), "carved" (from train) or "cleaned" (not the standard split)
    split_status: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def errors(self) -> list[CheckResult]:
        return [r for r in self.final if not r.success and r.severity == "error"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.final if not r.success and r.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["n_errors"], d["n_warnings"] = len(self.errors), len(self.warnings)
        return d


class DataValidationError(RuntimeError):
    """Error-level checks failed; ``report`` holds every result."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        lines = [f"data validation failed for domain {report.domain!r}:"]
        for r in report.errors:
            ex = "; ".join(short(e) for e in r.examples[:3])
            lines.append(f"  - [{r.split}] {r.check}: {r.description} — {r.unexpected_count} rows"
                         + (f"; {r.detail}" if r.detail else "") + (f"; e.g. {ex}" if ex else ""))
        super().__init__("\n".join(lines))


def _clip(value: object, limit: int) -> str:
    v = repr(value)
    return v if len(v) <= limit else v[: limit - 3] + "..."


def short(e: dict[str, Any], limit: int = 60) -> str:
    """'line 7 of train.jsonl: 'text' + 'pair' -> label' (both texts of a pair, each clipped)."""
    if "where" not in e:
        return _clip(e.get("value"), limit)
    texts = " + ".join(_clip(e[k], limit) for k in ("text", "text_pair") if k in e)
    label = f" -> {e['label']!r}" if e.get("label") is not None else ""
    also = f" (also train line {e['train_line']})" if e.get("train_line") else ""
    return f"{e['where']}: {texts}{label}{also}"


def _sources(cfg: DomainConfig, raw: RawDomain) -> dict[str, Source]:
    train = Source("train", raw.sources["train"], raw.line_kind.get("train", "line"))
    out = {}
    for split in SPLITS:
        if split in raw.sources:
            out[split] = Source(split, raw.sources[split], raw.line_kind.get(split, "line"))
        else:  # carved rows keep their train line, so they are named in the train file
            out[split] = Source(split, train.file, train.kind)
    return out


def validate_frames(frames: dict[str, pd.DataFrame], cfg: DomainConfig, runner: Runner | None = None,
                    sources: dict[str, Source] | None = None) -> list[CheckResult]:
    runner = runner or Runner()
    train = frames["train"]
    label_set = [str(x) for x in label_names_for(cfg, train)]
    results: list[CheckResult] = []
    for split, df in frames.items():
        src = (sources or {}).get(split) or Source(split, split)
        results += check_split(runner, df, src, cfg, label_set, None if split == "train" else train)
    return results


def _degenerate(cfg: DomainConfig, raw: RawDomain, prepared: PreparedDomain) -> list[CheckResult]:
    """A split that cleaning left empty or single-class: one clear error naming the step."""
    if severity(cfg, "cleaning_degenerate") == "off":
        return []
    out = []
    for split in dict.fromkeys(s.split for s in prepared.steps):
        raw_df = raw.frames[split]
        raw_classes = int(raw_df[LABEL].nunique())
        bad = next((s for s in prepared.steps if s.split == split
                    and (s.rows_after == 0 or s.classes_after < 2 <= raw_classes)), None)
        detail = "" if bad is None else (
            f"cleaning step {bad.step} left {split} with {bad.rows_after} rows and {bad.classes_after} class(es) "
            f"({len(raw_df)} rows, {raw_classes} classes in the file)")
        out.append(CheckResult(check="cleaning_degenerate", split=split, severity=severity(cfg, "cleaning_degenerate"),
                               success=bad is None, description=CHECKS["cleaning_degenerate"][1],
                               unexpected_count=0 if bad is None else 1, detail=detail))
    return out


def _corpus_results(runner: Runner, cfg: DomainConfig, raw: RawDomain,
                    prepared: PreparedDomain) -> tuple[list[CheckResult], list[CheckResult]]:
    if raw.unlabelled is None or raw.unlabelled_source is None:
        return [], []
    src = Source(CORPUS, raw.unlabelled_source)
    raw_res = check_corpus(runner, raw.unlabelled, list(range(1, len(raw.unlabelled) + 1)), src, cfg)
    used = prepared.unlabelled or []
    # Name the prepared corpus's texts by their file line: the first line holding each text, in order.
    lines, pos = [], 0
    for text in used:
        while pos < len(raw.unlabelled) and raw.unlabelled[pos].strip() != text:
            pos += 1
        lines.append(pos + 1)
        pos += 1
    if pos > len(raw.unlabelled):  # not derived from this file in order: number the entries instead
        lines, src = list(range(1, len(used) + 1)), Source(CORPUS, "the prepared corpus", "entry")
    return raw_res, check_corpus(runner, used, lines, src, cfg)


def _order(results: list[CheckResult]) -> list[CheckResult]:
    checks, splits = list(CHECKS), [*SPLITS, CORPUS]
    return sorted(results, key=lambda r: (checks.index(r.check), splits.index(r.split)))


def validate_domain(cfg: DomainConfig, raw: RawDomain, prepared: PreparedDomain | None = None) -> ValidationReport:
    """Validate the raw splits and corpus, then the prepared ones (``prepare``'s, computed if None): the latter decide."""
    t0 = time.perf_counter()
    prepared = prepared or prepare(cfg, raw)
    runner = Runner()
    sources = _sources(cfg, raw)
    raw_res = validate_frames(raw.frames, cfg, runner, sources)
    final = validate_frames(prepared.frames, cfg, runner, sources) + _degenerate(cfg, raw, prepared)
    corpus_raw, corpus_final = _corpus_results(runner, cfg, raw, prepared)
    rows = {s: {"raw": len(raw.frames.get(s, [])), "used": len(prepared.frames[s])} for s in SPLITS}
    if raw.unlabelled is not None:
        rows[CORPUS] = {"raw": len(raw.unlabelled), "used": len(prepared.unlabelled or [])}
    labels = {s: {str(k): int(v) for k, v in df[LABEL].value_counts(dropna=False).items()}
              for s, df in prepared.frames.items()}
    names = {s: src.file if s in raw.sources else f"carved from {src.file}" for s, src in sources.items()}
    if raw.unlabelled_source:
        names[CORPUS] = raw.unlabelled_source
    return ValidationReport(domain=cfg.name, sources=names, raw=_order(raw_res + corpus_raw),
                            final=_order(final + corpus_final), cleaning_notes=prepared.notes, row_counts=rows,
                            label_counts=labels, split_status=dict(prepared.split_status),
                            seconds=round(time.perf_counter() - t0, 2))
