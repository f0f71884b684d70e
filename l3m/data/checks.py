"""The data checks as Great Expectations (GX Core 1.x) expectations, and their results.

Every check is one GX expectation tagged with ``meta={"check": name}`` on a split, on a table
derived from it (labels per example, class counts), or on the unlabelled corpus. An example is
the PAIR in a pair domain everywhere: duplicates, conflicting labels and leakage compare
(text, text_pair), and reported examples show both texts. Rows are reported by their 1-based
line in the source file (``l3m.data.loading.read_raw``), as the user's editor counts lines.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from l3m.config import DomainConfig
from l3m.data.cleaning import example_keys
from l3m.data.columns import LABEL, LINE, PAIR, TEXT

# name -> (default severity, what it means). Order is the report's order.
CHECKS: dict[str, tuple[str, str]] = {
    "row_count": ("error", "split has at least validation.min_rows_per_split rows"),
    "cleaning_degenerate": ("error", "cleaning leaves the split non-empty and with at least two classes"),
    "text_not_null": ("error", "text present in every row"),
    "text_is_string": ("error", "text is a string"),
    "text_not_blank": ("error", "text non-empty after stripping whitespace"),
    "text_length": ("warning", "text length within [min_chars, max_chars] characters"),
    "label_not_null": ("error", "label present in every row"),
    "label_in_label_set": ("error", "label belongs to the declared / train label set"),
    "label_coverage": ("warning", "every train label also occurs in this split (labels seen in one split only)"),
    "duplicates": ("warning", "no duplicate examples (text, or text pair) within the split"),
    "conflicting_labels": ("warning", "the same example (text, or text pair) never carries two labels"),
    "train_test_leakage": ("error", "no dev/test example (text, or text pair) also appears in train"),
    "html_markup": ("warning", "no HTML entities or tags left in texts"),
    "class_min_examples": ("warning", "each class has at least validation.min_examples_per_class train examples"),
    "class_imbalance": ("warning", "largest/smallest train class ratio at most validation.max_imbalance_ratio"),
    "corpus_blank_lines": ("warning", "no blank lines in the unlabelled corpus"),
    "corpus_duplicates": ("warning", "no line of the unlabelled corpus repeated"),
    "corpus_length": ("warning", "corpus line length within [min_chars, max_chars] characters"),
}
HTML_RE = r"&(?:amp|lt|gt|quot|apos|nbsp|#\d+|#x[0-9a-fA-F]+);|</?(?:p|br|div|span|a|b|i|em|strong|li|ul)\b[^<>]*>"
MAX_EXAMPLES = 5
KEY = "_example_key"  # derived column: the pair as one string, for set membership checks


@dataclass
class CheckResult:
    check: str
    split: str
    severity: str
    success: bool
    description: str
    unexpected_count: int = 0
    # Each: line (1-based), file, where ("line 7 of train.jsonl"), text, [text_pair], [label], value.
    examples: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""


@dataclass
class Source:
    """Where a table's rows come from, for naming them: file name and 'line' or 'record'."""

    split: str
    file: str
    kind: str = "line"

    def where(self, line: int) -> str:
        return f"{self.kind} {line} of {os.path.basename(self.file)}"


def severity(cfg: DomainConfig, check: str) -> str:
    return cfg.validation.severity.get(check, CHECKS[check][0])


class Runner:
    """One ephemeral GX context; one pandas asset + suite per validated table."""

    def __init__(self) -> None:
        import great_expectations as gx  # a slow import: only when validating
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        # GX logs its ephemeral context's temporary docs site at INFO on every run: noise in
        # the user's log, nothing to act on. That module sets its own logger's level, so the
        # parent's level alone does not silence it.
        for name in ("great_expectations", "great_expectations.data_context.types.base"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.ctx = gx.get_context(mode="ephemeral")
        # One progress bar per expectation suite floods logs (and Prefect's log store).
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.source = self.ctx.data_sources.add_pandas("l3m")
        self.n = 0

    def run(self, df: pd.DataFrame, expectations: list[Any], cfg: DomainConfig) -> list[Any]:
        expectations = [e for e in expectations if severity(cfg, e.meta["check"]) != "off"]
        if not expectations:
            return []
        self.n += 1
        asset = self.source.add_dataframe_asset(f"t{self.n}")
        batch = asset.add_batch_definition_whole_dataframe("all")
        suite = self.ctx.suites.add(self.gx.ExpectationSuite(name=f"s{self.n}"))
        for e in expectations:
            suite.add_expectation(e)
        vd = self.ctx.validation_definitions.add(self.gx.ValidationDefinition(name=f"v{self.n}", data=batch, suite=suite))
        result = vd.run(batch_parameters={"dataframe": df}, result_format="COMPLETE")
        return list(result.results)


def example(df: pd.DataFrame, i: Any, src: Source, value: Any = None) -> dict[str, Any]:
    """One reported row: its file line and both texts (a pair domain's example is the pair)."""
    row = df.loc[i]
    line = int(row[LINE]) if LINE in df.columns else int(i) + 1
    out: dict[str, Any] = {"line": line, "file": os.path.basename(src.file), "where": src.where(line),
                           "text": row[TEXT]}
    if PAIR in df.columns:
        out[PAIR] = row[PAIR]
    if LABEL in df.columns:
        out[LABEL] = row[LABEL]
    out["value"] = value
    return out


def _split_expectations(split: str, df: pd.DataFrame, cfg: DomainConfig, label_set: list[str],
                        train_keys: list[str] | None) -> list[Any]:
    import great_expectations.expectations as E

    v = cfg.validation

    def m(check: str) -> dict[str, str]:
        return {"check": check}

    pair = PAIR in df.columns
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
        (E.ExpectCompoundColumnsToBeUnique(column_list=[TEXT, PAIR], meta=m("duplicates")) if pair
         else E.ExpectColumnValuesToBeUnique(column=TEXT, meta=m("duplicates"))),
    ]
    if split != "train":
        exps.append(E.ExpectColumnDistinctValuesToContainSet(column=LABEL, value_set=label_set, meta=m("label_coverage")))
        if train_keys is not None:
            exps.append(E.ExpectColumnValuesToNotBeInSet(column=KEY if pair else TEXT, value_set=train_keys,
                                                          meta=m("train_test_leakage")))
    return exps


def _derived(split: str, df: pd.DataFrame, cfg: DomainConfig) -> list[tuple[pd.DataFrame, list[Any]]]:
    """Tables derived from a split (labels per example; class counts) and the expectations on them."""
    import great_expectations.expectations as E

    per_example = df.groupby(example_keys(df))[LABEL].nunique().rename("n_labels").reset_index()
    out = [(per_example, [E.ExpectColumnValuesToBeBetween(column="n_labels", max_value=1,
                                                           meta={"check": "conflicting_labels"})])]
    if split == "train":
        counts = df[LABEL].dropna().value_counts().rename_axis(LABEL).reset_index(name="count")
        ratio = pd.DataFrame({"ratio": [counts["count"].max() / max(1, counts["count"].min())]})
        out.append((counts, [E.ExpectColumnValuesToBeBetween(column="count", min_value=cfg.validation.min_examples_per_class,
                                                             meta={"check": "class_min_examples"})]))
        out.append((ratio, [E.ExpectColumnValuesToBeBetween(column="ratio", max_value=cfg.validation.max_imbalance_ratio,
                                                             meta={"check": "class_imbalance"})]))
    return out


def _class_detail(name: str, df: pd.DataFrame, cfg: DomainConfig) -> tuple[str, int]:
    counts = df[LABEL].dropna().astype(str).value_counts()
    if counts.empty:
        return "no labelled rows", 0
    if name == "class_min_examples":
        small = counts[counts < cfg.validation.min_examples_per_class]
        return ("small classes: " + ", ".join(f"{k} ({v})" for k, v in small.items())) if len(small) else "", len(small)
    ratio = counts.iloc[0] / counts.iloc[-1]
    # Shown whether or not the check passes: a 21:1 ratio under a threshold of 50 is still worth seeing.
    return (f"ratio {ratio:.1f}: {counts.index[0]} ({counts.iloc[0]}) vs {counts.index[-1]} ({counts.iloc[-1]}); "
            f"threshold {cfg.validation.max_imbalance_ratio:g} (validation.max_imbalance_ratio)"), 1


def _to_result(r: Any, df: pd.DataFrame, src: Source, cfg: DomainConfig, label_set: list[str],
               train_lines: dict[str, int]) -> CheckResult:
    name = r.expectation_config.meta["check"]
    res = r.result or {}
    idx = res.get("unexpected_index_list") or []
    vals = res.get("unexpected_list") or res.get("partial_unexpected_list") or []
    examples: list[dict[str, Any]] = []
    detail, count = "", 0
    if name in ("conflicting_labels", "class_min_examples", "class_imbalance", "row_count", "label_coverage"):
        pass  # examples are built below from the split itself, not from the derived table's rows
    elif idx:
        examples = [example(df, i, src, val) for i, val in list(zip(idx, vals, strict=False))[:MAX_EXAMPLES]]
    if name == "train_test_leakage":
        for e in examples:  # where the leaked example sits in train, so both copies can be found
            e["train_line"] = train_lines.get(e["value"])
    if name == "label_coverage" and not r.success:
        missing = sorted(set(label_set) - set(df[LABEL].dropna()))
        detail, count = f"labels absent from {src.split}: {missing}", len(missing)
    elif name == "row_count":
        detail = f"{len(df)} rows"
    elif name in ("class_min_examples", "class_imbalance"):
        detail, n = _class_detail(name, df, cfg)
        count = 0 if r.success else n
    elif name == "conflicting_labels" and not r.success:
        keys = example_keys(df)
        conflicted = set(df.groupby(keys)[LABEL].nunique().loc[lambda s: s > 1].index)
        unit = "pairs" if PAIR in df.columns else "texts"
        detail, count = f"{len(conflicted)} {unit} carry more than one label", len(conflicted)
        examples = [example(df, i, src, df.at[i, LABEL]) for i in df.index[keys.isin(conflicted)][:MAX_EXAMPLES]]
    if r.exception_info and r.exception_info.get("raised_exception"):
        detail = f"check could not run: {r.exception_info.get('exception_message')}"
    if not count:
        count = res.get("unexpected_count") or (len(vals) if not r.success else 0)
    return CheckResult(check=name, split=src.split, severity=severity(cfg, name), success=bool(r.success),
                       description=CHECKS[name][1], unexpected_count=int(count or 0), examples=examples, detail=detail)


def check_split(runner: Runner, df: pd.DataFrame, src: Source, cfg: DomainConfig, label_set: list[str],
                train: pd.DataFrame | None) -> list[CheckResult]:
    """Every split-level check on one split; ``train`` (None for train itself) for leakage."""
    df = df.reset_index(drop=True)
    train_lines: dict[str, int] = {}
    train_keys = None
    if train is not None:
        keys = example_keys(train)
        lines = train[LINE] if LINE in train.columns else pd.Series(range(1, len(train) + 1))
        train_lines = {k: int(ln) for k, ln in zip(reversed(keys.tolist()), reversed(lines.tolist()), strict=True)}
        train_keys = sorted(train_lines)
    if PAIR in df.columns:
        df[KEY] = example_keys(df)
    out = []
    tables = [(df, _split_expectations(src.split, df, cfg, label_set, train_keys))] + _derived(src.split, df, cfg)
    for table, exps in tables:
        for r in runner.run(table, exps, cfg):
            out.append(_to_result(r, df, src, cfg, label_set, train_lines))
    return out


def check_corpus(runner: Runner, lines: list[str], line_numbers: list[int], src: Source,
                 cfg: DomainConfig) -> list[CheckResult]:
    """Blank, repeated and too short/long lines of the unlabelled corpus, by file line."""
    import great_expectations.expectations as E

    v = cfg.validation
    stripped = [ln.strip() for ln in lines]
    # Blank lines are null here so duplicates and lengths speak of texts only (GX skips nulls).
    df = pd.DataFrame({TEXT: lines, KEY: [s if s else None for s in stripped], LINE: line_numbers})
    exps = [E.ExpectColumnValuesToNotMatchRegex(column=TEXT, regex=r"^\s*$", meta={"check": "corpus_blank_lines"}),
            E.ExpectColumnValuesToBeUnique(column=KEY, meta={"check": "corpus_duplicates"}),
            E.ExpectColumnValueLengthsToBeBetween(column=KEY, min_value=v.min_chars, max_value=v.max_chars,
                                                  meta={"check": "corpus_length"})]
    out = []
    for r in runner.run(df, exps, cfg):
        name = r.expectation_config.meta["check"]
        res = r.result or {}
        idx = res.get("unexpected_index_list") or []
        vals = res.get("unexpected_list") or []
        examples = [example(df, i, src, val) for i, val in list(zip(idx, vals, strict=False))[:MAX_EXAMPLES]]
        detail = ""
        if name == "corpus_duplicates" and not r.success:
            repeats = df[KEY].dropna().duplicated().sum()
            detail = f"{int(repeats)} lines repeat an earlier line"
        out.append(CheckResult(check=name, split=src.split, severity=severity(cfg, name), success=bool(r.success),
                               description=CHECKS[name][1], unexpected_count=int(res.get("unexpected_count") or 0),
                               examples=examples, detail=detail))
    return out
