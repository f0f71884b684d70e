"""Render a ValidationReport as markdown (for people and Prefect artifacts), HTML and JSON."""

from __future__ import annotations

import html
import json
from pathlib import Path

from l3m.data.validation import CheckResult, ValidationReport


def _cell(text: object, limit: int = 90) -> str:
    s = str(text).replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _examples(r: CheckResult) -> str:
    parts = []
    for e in r.examples[:3]:
        prefix = f"row {e['row']}: " if "row" in e else ""
        parts.append(prefix + _cell(repr(e["value"]), 60))
    return "; ".join(parts)


def _status(r: CheckResult) -> str:
    if r.success:
        return "ok"
    return "**ERROR**" if r.severity == "error" else "warning"


def _table(results: list[CheckResult], only_failed: bool) -> list[str]:
    lines = ["| split | check | status | rows | detail / examples |", "|---|---|---|---|---|"]
    for r in results:
        if only_failed and r.success:
            continue
        detail = "; ".join(x for x in (r.detail, _examples(r)) if x)
        lines.append(f"| {r.split} | {r.check} | {_status(r)} | {r.unexpected_count} | {_cell(detail, 160)} |")
    return lines


def to_markdown(rep: ValidationReport) -> str:
    verdict = "PASSED" if rep.passed else "FAILED"
    out = [
        f"# Data validation: `{rep.domain}` — {verdict}",
        "",
        f"{len(rep.errors)} error(s), {len(rep.warnings)} warning(s) after cleaning; "
        f"validated with Great Expectations in {rep.seconds} s.",
        "",
        "| split | source | rows (raw) | rows (after cleaning) |",
        "|---|---|---|---|",
    ]
    for s, n in rep.row_counts.items():
        out.append(f"| {s} | `{rep.sources.get(s, '')}` | {n['raw']} | {n['clean']} |")
    out += ["", "## Problems found in the raw data", ""]
    raw_failed = [r for r in rep.raw if not r.success]
    out += _table(rep.raw, only_failed=True) if raw_failed else ["None."]
    out += ["", "## Cleaning applied", ""]
    out += [f"- {n}" for n in rep.cleaning_notes] or ["None configured (or nothing to change)."]
    out += ["", "## Checks deciding the run (after cleaning)", ""]
    failed = [r for r in rep.final if not r.success]
    out += _table(rep.final, only_failed=True) if failed else ["All checks passed."]
    passed = sorted({r.check for r in rep.final} - {r.check for r in failed})
    out += ["", f"Passed everywhere: {', '.join(passed)}."]
    out += ["", "## Labels per split (after cleaning)", ""]
    labels = sorted({lab for c in rep.label_counts.values() for lab in c})
    out.append("| label | " + " | ".join(rep.label_counts) + " |")
    out.append("|---|" + "---|" * len(rep.label_counts))
    for lab in labels:
        out.append(f"| {lab} | " + " | ".join(str(c.get(lab, 0)) for c in rep.label_counts.values()) + " |")
    return "\n".join(out) + "\n"


def to_html(rep: ValidationReport) -> str:
    """A self-contained page: the markdown tables as HTML, failed rows coloured."""
    rows = []
    for title, results in (("Raw data", rep.raw), ("After cleaning (decides the run)", rep.final)):
        rows.append(f"<h2>{html.escape(title)}</h2><table><tr><th>split</th><th>check</th><th>severity</th>"
                    "<th>status</th><th>rows</th><th>detail / examples</th></tr>")
        for r in results:
            cls = "ok" if r.success else r.severity
            detail = html.escape("; ".join(x for x in (r.detail, _examples(r)) if x))
            rows.append(f"<tr class='{cls}'><td>{r.split}</td><td title='{html.escape(r.description)}'>{r.check}</td>"
                        f"<td>{r.severity}</td><td>{'ok' if r.success else 'FAILED'}</td>"
                        f"<td>{r.unexpected_count}</td><td>{detail}</td></tr>")
        rows.append("</table>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in rep.cleaning_notes) or "<li>none</li>"
    verdict = "PASSED" if rep.passed else "FAILED"
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 6px;font-size:13px}tr.error{background:#fdd}tr.warning{background:#ffd}tr.ok{color:#555}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>l3m validation {rep.domain}</title>"
            f"<style>{style}</style></head><body><h1>Data validation: {html.escape(rep.domain)} — {verdict}</h1>"
            f"<p>{len(rep.errors)} error(s), {len(rep.warnings)} warning(s).</p><h2>Cleaning</h2><ul>{notes}</ul>"
            + "".join(rows) + "</body></html>")


def write_report(rep: ValidationReport, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "validation.md", "html": out_dir / "validation.html",
             "json": out_dir / "validation.json"}
    paths["markdown"].write_text(to_markdown(rep), encoding="utf-8")
    paths["html"].write_text(to_html(rep), encoding="utf-8")
    paths["json"].write_text(json.dumps(rep.to_dict(), indent=2, default=str), encoding="utf-8")
    return paths
