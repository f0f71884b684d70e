"""Cleaning and carving on pandas frames: the repairs a domain opts into, and missing dev/test splits.

Policy (docs/validation.md): the standard dev/test splits are never altered unless the domain sets
``cleaning.eval_splits``, because published numbers are computed on the files as shipped; repairs
act on train, and leakage handling removes train rows, never dev/test rows. Every step is logged
with row counts so validation can name the step that left a split empty or single-class.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from datasets import ClassLabel, Dataset, Features, Value

from l3m.config import CleaningSpec, SplitSpec
from l3m.data.columns import LABEL, PAIR, TEXT

_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_SPACE = re.compile(r"\s+")


@dataclass
class StepCount:
    """Rows and classes of one split after one cleaning step (rows_before: before that step)."""

    split: str
    step: str
    rows_before: int
    rows_after: int
    classes_after: int


def unescape(text: object) -> object:
    if not isinstance(text, str):
        return text
    return _SPACE.sub(" ", _TAG.sub(" ", html.unescape(text))).strip()


def text_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in (TEXT, PAIR) if c in df.columns]


def example_keys(df: pd.DataFrame, norm: Callable[[object], object] = lambda t: t) -> pd.Series:
    """One string per row identifying the example: its text, or for a pair domain the (text, pair) pair."""
    if PAIR not in df.columns:
        return df[TEXT].map(lambda t: str(norm(t)))
    return pd.Series([json.dumps([norm(t), norm(p)], default=str) for t, p in zip(df[TEXT], df[PAIR], strict=True)],
                     index=df.index, dtype=object)


def _blank(df: pd.DataFrame) -> pd.Series:
    blank = df[text_columns(df)].map(lambda t: not isinstance(t, str) or not t.strip()).any(axis=1)
    return blank | df[LABEL].isna()


def _clean_one(split: str, df: pd.DataFrame, spec: CleaningSpec,
               notes: list[str], log: list[StepCount]) -> pd.DataFrame:
    def record(step: str, before: int, out: pd.DataFrame) -> None:
        log.append(StepCount(split, step, before, len(out), int(out[LABEL].nunique())))

    if spec.unescape_html:
        before_text = df[TEXT].copy()
        for col in text_columns(df):
            df[col] = df[col].map(unescape)
        changed = int((before_text != df[TEXT]).sum())
        if changed:
            notes.append(f"{split}: unescaped HTML in {changed} texts")
        record("unescape_html", len(df), df)
    if spec.drop_empty:
        n, blank = len(df), _blank(df)
        if blank.any():
            notes.append(f"{split}: dropped {int(blank.sum())} rows with empty/null text or label")
            df = df[~blank]
        record("drop_empty", n, df)
    if spec.dedupe:
        n, key = len(df), example_keys(df)
        conflicting = df.groupby(key, dropna=False)[LABEL].transform("nunique") > 1
        df = df[~conflicting]
        df = df[~pd.concat([example_keys(df), df[LABEL].astype(str)], axis=1).duplicated()]
        if n != len(df):
            unit = "pairs" if PAIR in df.columns else "texts"
            notes.append(f"{split}: dedupe removed {n - len(df)} rows "
                         f"({int(conflicting.sum())} with conflicting labels, compared as {unit})")
        record("dedupe", n, df)
    return df.reset_index(drop=True)


def clean_splits(frames: dict[str, pd.DataFrame], spec: CleaningSpec) -> tuple[dict[str, pd.DataFrame],
                                                                              list[str], list[StepCount]]:
    """Apply the configured repairs to train (and to dev/test only with ``spec.eval_splits``)."""
    out: dict[str, pd.DataFrame] = {}
    notes: list[str] = []
    log: list[StepCount] = []
    for split, df in frames.items():
        if split == "train" or spec.eval_splits:
            out[split] = _clean_one(split, df.copy(), spec, notes, log)
        else:
            out[split] = df.copy()
    return out, notes, log


def drop_leaked(frames: dict[str, pd.DataFrame], spec: CleaningSpec, log: list[StepCount]) -> list[str]:
    """Remove train rows whose example (pair, for a pair domain) also occurs in dev/test; in place."""
    if not spec.drop_leaked_from_train:
        return []
    # Train may be unescaped while dev/test stay as shipped: compare both in the same form.
    norm: Callable[[object], object] = unescape if spec.unescape_html else (lambda t: t)
    held_out: set[str] = set()
    for split in ("dev", "test"):
        if split in frames:
            held_out |= set(example_keys(frames[split], norm))
    train = frames["train"]
    leaked = example_keys(train, norm).isin(held_out)
    frames["train"] = train[~leaked].reset_index(drop=True)
    log.append(StepCount("train", "drop_leaked_from_train", len(train), len(frames["train"]),
                         int(frames["train"][LABEL].nunique())))
    if not leaked.any():
        return []
    what = "pair" if PAIR in train.columns else "text"
    return [f"train: dropped {int(leaked.sum())} rows whose {what} also appears in dev/test"]


def clean_corpus(lines: list[str], spec: CleaningSpec) -> tuple[list[str], list[str]]:
    """The unlabelled corpus as used: stripped non-blank lines, deduplicated with ``dedupe_unlabelled``."""
    texts = [ln.strip() for ln in lines if ln.strip()]
    notes = []
    if len(texts) != len(lines):
        notes.append(f"unlabelled: skipped {len(lines) - len(texts)} blank lines")
    if spec.dedupe_unlabelled:
        unique = list(dict.fromkeys(texts))
        if len(unique) != len(texts):
            notes.append(f"unlabelled: dedupe_unlabelled removed {len(texts) - len(unique)} repeated lines")
        texts = unique
    return texts, notes


def _stratify_ids(labels: pd.Series, label_names: list[str]) -> tuple[list[int], list[str]]:
    # Null or undeclared labels get classes of their own so the carve never crashes on them;
    # validation reports those rows (label_not_null / label_in_label_set).
    keys = ["\x00null" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v) for v in labels]
    names = list(label_names) + sorted(set(keys) - set(label_names))
    index = {n: i for i, n in enumerate(names)}
    return [index[k] for k in keys], names


def carve(frames: dict[str, pd.DataFrame], spec: SplitSpec, label_names: list[str]) -> list[str]:
    """Carve missing test, then dev, from train: stratified, seeded; in place; returns notes.

    The carve goes through ``datasets``' ``train_test_split`` on the label ids, which is what
    carving used before it moved here, so an unchanged train gives the same carved rows.
    """
    notes = []
    for split, frac in (("test", spec.test_fraction), ("dev", spec.dev_fraction)):
        if split in frames:
            continue
        train = frames["train"]
        ids, names = _stratify_ids(train[LABEL], label_names)
        ds = Dataset.from_dict({"i": list(range(len(train))), LABEL: ids},
                               features=Features({"i": Value("int64"), LABEL: ClassLabel(names=names)}))
        try:
            parted = ds.train_test_split(test_size=frac, seed=spec.seed, stratify_by_column=LABEL)
            how = "stratified"
        except ValueError:  # a class with a single example cannot be stratified
            try:
                parted = ds.train_test_split(test_size=frac, seed=spec.seed)
                how = "random (a class was too small to stratify)"
            except ValueError:  # too few rows to carve at all: validation reports the empty split
                frames[split] = train.iloc[:0].copy()
                notes.append(f"{split}: missing, and train's {len(train)} rows are too few to carve it from")
                continue
        frames["train"] = train.iloc[parted["train"]["i"]].reset_index(drop=True)
        frames[split] = train.iloc[parted["test"]["i"]].reset_index(drop=True)
        notes.append(f"{split}: missing, carved {len(frames[split])} of {len(train)} train rows "
                     f"({how}, seed {spec.seed})")
    return notes


def split_status(raw: dict[str, pd.DataFrame], used: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Per evaluation split: 'standard' (the file as shipped), 'carved' (from train) or 'cleaned'."""
    status = {}
    for split in ("dev", "test"):
        if split not in raw:
            status[split] = "carved"
            continue
        same = raw[split].reset_index(drop=True).equals(used[split][list(raw[split].columns)].reset_index(drop=True))
        status[split] = "standard" if same else "cleaned"
    return status
