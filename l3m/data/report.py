"""Render a ValidationReport as markdown (for people and Prefect artifacts), HTML and JSON."""

from __future__ import annotations

import html
import json
from pathlib import Path

from l3m.data.validation import CheckResult, ValidationReport, short


def _cell(text: object, limit: int = 90) -> str:
    s = str(text).replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _examples(r: CheckResult) -> str:
    return "; ".join(short(e, 50) for e in r.examples[:3])


LINES_NOTE = ("Rows are named by their 1-based line in the source file, as an editor counts lines (\"line N of "
              "<file>\"; blank lines counted; a CSV's header is line 1); rows of a carved dev/test split by their "
              "line in the train file.")
STATUS = {"standard": "standard split (file unaltered)", "carved": "carved from train",
          "cleaned": "**cleaned: not the standard split**"}


def _row_table(rep: ValidationReport) -> list[str]:
    out = ["| split | source | rows (raw) | rows (used) | |", "|---|---|---|---|---|"]
    for s, n in rep.row_counts.items():
        status = STATUS.get(rep.split_status.get(s, ""), "")
        out.append(f"| {s} | `{rep.sources.get(s, '')}` | {n['raw']} | {n['used']} | {status} |")
    return out


def _imbalance(rep: ValidationReport) -> list[str]:
    r = next((r for r in rep.final if r.check == "class_imbalance"), None)
    if r is None or not r.detail:
        return []
    return ["", f"Class balance (train, as used): {r.detail} — {_status(r)}."]


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
    ]
    out += _row_table(rep)
    cleaned = [s for s, st in rep.split_status.items() if st == "cleaned"]
    if cleaned:
        out += ["", f"**{' and '.join(cleaned)} cleaned (cleaning.eval_splits): not the standard splits; "
                "scores on them are not comparable with published ones.**"]
    out += ["", LINES_NOTE]
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
    out += _imbalance(rep)
    out += ["", "## Labels per split (as used)", ""]
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
    splits = "<table><tr><th>split</th><th>source</th><th>rows (raw)</th><th>rows (used)</th><th></th></tr>" + "".join(
        f"<tr><td>{s}</td><td>{html.escape(rep.sources.get(s, ''))}</td><td>{n['raw']}</td><td>{n['used']}</td>"
        f"<td>{STATUS.get(rep.split_status.get(s, ''), '').replace('**', '')}</td></tr>"
        for s, n in rep.row_counts.items()) + "</table>"
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 6px;font-size:13px}tr.error{background:#fdd}tr.warning{background:#ffd}tr.ok{color:#555}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>l3m validation {rep.domain}</title>"
            f"<style>{style}</style></head><body><h1>Data validation: {html.escape(rep.domain)} — {verdict}</h1>"
            f"<p>{len(rep.errors)} error(s), {len(rep.warnings)} warning(s).</p>{splits}"
            f"<p>{html.escape(LINES_NOTE)}</p><h2>Cleaning</h2><ul>{notes}</ul>"
            + "".join(rows) + "</body></html>")


def write_report(rep: ValidationReport, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "validation.md", "html": out_dir / "validation.html",
             "json": out_dir / "validation.json"}
    paths["markdown"].write_text(to_markdown(rep), encoding="utf-8")
    paths["html"].write_text(to_html(rep), encoding="utf-8")
    paths["json"].write_text(json.dumps(rep.to_dict(), indent=2, default=str), encoding="utf-8")
    return paths
