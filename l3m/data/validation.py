"""Data validation with Great Expectations (GX Core 1.x), built in code.

Every check is one (or a few) GX expectations tagged with ``meta={"check": name}``; its severity
decides whether a failure stops the run (``error``) or is only reported (``warning``). Checks
that need a derived table (class counts, labels per text) validate that table with GX too.

The raw splits are validated first, so the report shows the data as it is; when the domain
config enables cleaning, the cleaned splits are validated again and *those* results decide.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from l3m.config import DomainConfig
from l3m.data.loading import LABEL, PAIR, TEXT, RawDomain, clean

# name -> (default severity, what it means). Order is the report's order.
CHECKS: dict[str, tuple[str, str]] = {
    "row_count": ("error", "split has at least validation.min_rows_per_split rows"),
    "text_not_null": ("error", "text present in every row"),
    "text_is_string": ("error", "text is a string"),
    "text_not_blank": ("error", "text non-empty after stripping whitespace"),
    "text_length": ("warning", "text length within [min_chars, max_chars] characters"),
    "label_not_null": ("error", "label present in every row"),
    "label_in_label_set": ("error", "label belongs to the declared / train label set"),
    "label_coverage": ("warning", "every train label also occurs in this split (labels seen in one split only)"),
    "duplicates": ("warning", "no duplicate texts within the split"),
    "conflicting_labels": ("warning", "the same text never carries two labels"),
    "train_test_leakage": ("error", "no dev/test text also appears in train"),
    "html_markup": ("warning", "no HTML entities or tags left in texts"),
    "class_min_examples": ("warning", "each class has at least validation.min_examples_per_class train examples"),
    "class_imbalance": ("warning", "largest/smallest train class ratio at most validation.max_imbalance_ratio"),
}
HTML_RE = r"&(?:amp|lt|gt|quot|apos|nbsp|#\d+|#x[0-9a-fA-F]+);|</?(?:p|br|div|span|a|b|i|em|strong|li|ul)\b[^<>]*>"
MAX_EXAMPLES = 5


@dataclass
class CheckResult:
    check: str
    split: str
    severity: str
    success: bool
    description: str
    unexpected_count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""


@dataclass
class ValidationReport:
    domain: str
    sources: dict[str, str]
    raw: list[CheckResult]
    final: list[CheckResult]  # after cleaning (== raw when no cleaning is configured)
    cleaning_notes: list[str]
    row_counts: dict[str, dict[str, int]]
    label_counts: dict[str, dict[str, int]]
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
            ex = "; ".join(_short(e) for e in r.examples[:3])
            lines.append(f"  - [{r.split}] {r.check}: {r.description} — {r.unexpected_count} rows"
                         + (f"; {r.detail}" if r.detail else "") + (f"; e.g. {ex}" if ex else ""))
        super().__init__("\n".join(lines))


def _short(example: dict[str, Any]) -> str:
    v = repr(example.get("value"))
    v = v if len(v) <= 80 else v[:77] + "..."
    return f"row {example['row']}: {v}" if "row" in example else v


class _Runner:
    """One ephemeral GX context; one pandas asset + suite per validated table."""

    def __init__(self) -> None:
        import great_expectations as gx  # ~2 s import: only when validating
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        # One progress bar per expectation suite floods logs (and Prefect's log store).
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.source = self.ctx.data_sources.add_pandas("l3m")
        self.n = 0

    def run(self, df: pd.DataFrame, expectations: list[Any]) -> list[Any]:
        self.n += 1
        asset = self.source.add_dataframe_asset(f"t{self.n}")
        batch = asset.add_batch_definition_whole_dataframe("all")
        suite = self.ctx.suites.add(self.gx.ExpectationSuite(name=f"s{self.n}"))
        for e in expectations:
            suite.add_expectation(e)
        vd = self.ctx.validation_definitions.add(self.gx.ValidationDefinition(name=f"v{self.n}", data=batch, suite=suite))
        result = vd.run(batch_parameters={"dataframe": df}, result_format="COMPLETE")
        return list(result.results)


def _split_expectations(split: str, df: pd.DataFrame, cfg: DomainConfig, label_set: list[str],
                        train_texts: list[str] | None) -> list[Any]:
    import great_expectations.expectations as E

    v = cfg.validation

    def m(check: str) -> dict[str, str]:
        return {"check": check}

    key = [TEXT, PAIR] if PAIR in df.columns else [TEXT]
    exps = [
        E.ExpectTableRowCountToBeBetween(min_value=v.min_rows_per_split, meta=m("row_count")),
        E.ExpectColumnValuesToNotBeNull(column=TEXT, meta=m("text_not_null")),
        E.ExpectColumnValuesToBeOfType(column=TEXT, type_="str", meta=m("text_is_string")),
        E.ExpectColumnValuesToNotMatchRegex(column=TEXT, regex=r"^\s*$", meta=m("text_not_blank")),
        E.ExpectColumnValueLengthsToBeBetween(column=TEXT, min_value=v.min_chars, max_value=v.max_chars,
                                              meta=m("text_length")),
        E.ExpectColumnValuesToNotBeNull(column=LABEL, meta=m("label_not_null")),
        E.ExpectColumnValuesToBeInSet(column=LABEL, value_set=label_set, meta=m("label_in_label_set")),
        E.ExpectColumnValuesToNotMatchRegex(column=TEXT, regex=HTML_RE, meta=m("html_markup")),
        (E.ExpectCompoundColumnsToBeUnique(column_list=key, meta=m("duplicates")) if len(key) > 1
         else E.ExpectColumnValuesToBeUnique(column=TEXT, meta=m("duplicates"))),
    ]
    if split != "train":
        exps.append(E.ExpectColumnDistinctValuesToContainSet(column=LABEL, value_set=label_set, meta=m("label_coverage")))
        if train_texts is not None:
            exps.append(E.ExpectColumnValuesToNotBeInSet(column=TEXT, value_set=train_texts, meta=m("train_test_leakage")))
    return exps


def _derived(split: str, df: pd.DataFrame, cfg: DomainConfig) -> list[tuple[pd.DataFrame, list[Any]]]:
    """Tables derived from a split (labels per text; class counts) and the expectations on them."""
    import great_expectations.expectations as E

    out = []
    texts = df[df[TEXT].map(lambda t: isinstance(t, str))]
    per_text = texts.groupby(TEXT)[LABEL].nunique().rename("n_labels").reset_index()
    out.append((per_text, [E.ExpectColumnValuesToBeBetween(column="n_labels", max_value=1,
                                                           meta={"check": "conflicting_labels"})]))
    if split == "train":
        counts = df[LABEL].dropna().value_counts().rename_axis(LABEL).reset_index(name="count")
        ratio = pd.DataFrame({"ratio": [counts["count"].max() / max(1, counts["count"].min())]})
        out.append((counts, [E.ExpectColumnValuesToBeBetween(column="count", min_value=cfg.validation.min_examples_per_class,
                                                             meta={"check": "class_min_examples"})]))
        out.append((ratio, [E.ExpectColumnValuesToBeBetween(column="ratio", max_value=cfg.validation.max_imbalance_ratio,
                                                             meta={"check": "class_imbalance"})]))
    return out


def _to_result(split: str, r: Any, df: pd.DataFrame, cfg: DomainConfig, label_set: list[str]) -> CheckResult:
    name = r.expectation_config.meta["check"]
    default, description = CHECKS[name]
    severity = cfg.validation.severity.get(name, default)
    res = r.result or {}
    examples: list[dict[str, Any]] = []
    idx = res.get("unexpected_index_list") or []
    vals = res.get("partial_unexpected_list") or res.get("unexpected_list") or []
    for i, val in list(zip(idx, vals, strict=False))[:MAX_EXAMPLES] or [(None, x) for x in vals[:MAX_EXAMPLES]]:
        if isinstance(val, dict) and "count" in val:  # derived tables: show the row itself
            examples.append({"value": val})
        elif i is not None and name not in ("conflicting_labels", "class_min_examples", "class_imbalance"):
            examples.append({"row": int(i), "value": val})
        else:
            examples.append({"value": val})
    detail, count = "", 0
    if name == "label_coverage" and not r.success:
        missing = sorted(set(label_set) - set(df[LABEL].dropna()))
        detail = f"labels absent from {split}: {missing}"
        count = len(missing)
    elif name == "row_count":
        detail = f"{len(df)} rows"
    elif name == "class_min_examples" and not r.success:
        counts = df[LABEL].dropna().value_counts()
        small = counts[counts < cfg.validation.min_examples_per_class]
        detail = "small classes: " + ", ".join(f"{k} ({v})" for k, v in small.items())
        examples, count = [], len(small)
    elif name == "class_imbalance" and not r.success:
        counts = df[LABEL].dropna().value_counts()
        detail = (f"{counts.index[0]} ({counts.iloc[0]}) vs {counts.index[-1]} ({counts.iloc[-1]}): "
                  f"ratio {counts.iloc[0] / counts.iloc[-1]:.0f}")
        examples, count = [], 1
    elif name == "conflicting_labels" and not r.success:
        conflicted = set(df.groupby(TEXT)[LABEL].nunique().loc[lambda s: s > 1].index)
        detail, count = f"{len(conflicted)} texts carry more than one label", len(conflicted)
        rows = df[df[TEXT].isin(conflicted)].head(MAX_EXAMPLES)
        examples = [{"row": int(i), "value": f"{t[:60]} -> {lab}"} for i, t, lab in zip(rows.index, rows[TEXT], rows[LABEL], strict=True)]
    if r.exception_info and r.exception_info.get("raised_exception"):
        detail = f"check could not run: {r.exception_info.get('exception_message')}"
    if not count:
        count = res.get("unexpected_count") or (len(vals) if not r.success else 0)
    return CheckResult(check=name, split=split, severity=severity, success=bool(r.success),
                       description=description, unexpected_count=int(count or 0), examples=examples, detail=detail)


def validate_frames(frames: dict[str, pd.DataFrame], cfg: DomainConfig, runner: _Runner | None = None) -> list[CheckResult]:
    runner = runner or _Runner()
    train = frames["train"]
    label_set = list(cfg.labels) if cfg.labels else sorted(set(train[LABEL].dropna()))
    train_texts = sorted({t for t in train[TEXT] if isinstance(t, str)})
    results: list[CheckResult] = []
    for split, df in frames.items():
        tables = [(df, _split_expectations(split, df, cfg, label_set, train_texts))] + _derived(split, df, cfg)
        for table, exps in tables:
            exps = [e for e in exps if cfg.validation.severity.get(e.meta["check"]) != "off"]
            for r in runner.run(table, exps):
                results.append(_to_result(split, r, df, cfg, label_set))
    order = list(CHECKS)
    return sorted(results, key=lambda r: (order.index(r.check), ("train", "dev", "test").index(r.split)))


def validate_domain(cfg: DomainConfig, raw: RawDomain) -> ValidationReport:
    """Validate raw splits, apply configured cleaning, validate again; the latter decides."""
    t0 = time.perf_counter()
    runner = _Runner()
    raw_results = validate_frames(raw.frames, cfg, runner)
    cleaned, notes = clean(raw, cfg.cleaning)
    final = validate_frames(cleaned, cfg, runner) if notes else raw_results
    rows = {s: {"raw": len(raw.frames[s]), "clean": len(cleaned[s])} for s in raw.frames}
    labels = {s: {str(k): int(v) for k, v in cleaned[s][LABEL].value_counts(dropna=False).items()} for s in cleaned}
    return ValidationReport(domain=cfg.name, sources=raw.sources, raw=raw_results, final=final,
                            cleaning_notes=notes, row_counts=rows, label_counts=labels,
                            seconds=round(time.perf_counter() - t0, 2))
