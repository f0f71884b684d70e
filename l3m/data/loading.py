"""Load a domain's splits into a ``datasets.DatasetDict`` with a stable label mapping.

Reading is three-staged on purpose: ``read_raw`` returns the splits as they are on disk (as
pandas frames, values untouched, each row's 1-based source line in ``line``) and the raw
unlabelled corpus, so validation can report the real problems where the user's editor finds
them; ``prepare`` applies the configured cleaning and carves missing dev/test splits (both in
``l3m.data.cleaning``), so validation checks exactly the rows later steps use; ``build_domain``
turns the prepared frames into the dataset every later step uses.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

from l3m.config import DomainConfig, SplitSource
from l3m.data.cleaning import StepCount, carve, clean_corpus, clean_splits, drop_leaked, split_status
from l3m.data.columns import LABEL, LINE, PAIR, SPLITS, TEXT
from l3m.data.remote import DownloadError, local_copy

__all__ = ["LABEL", "LINE", "PAIR", "SPLITS", "TEXT", "DataError", "LoadedDomain", "PreparedDomain", "RawDomain",
           "build_domain", "load_domain", "load_unlabelled", "prepare", "read_raw"]


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, and the line where known."""


@dataclass
class RawDomain:
    """Splits as read from disk, normalised only in column names (text/text_pair/label).

    Each frame has a ``line`` column: the row's 1-based line in its file (the physical line,
    blank lines counted; a CSV's header is line 1), or its 1-based record number where the
    format has no lines (``line_kind[split] == "record"``: parquet, a JSON array, a URL).
    """

    frames: dict[str, pd.DataFrame]
    sources: dict[str, str]
    has_pair: bool
    line_kind: dict[str, str] = field(default_factory=dict)
    unlabelled: list[str] | None = None  # every physical line of the corpus file, blank ones included
    unlabelled_source: str | None = None


@dataclass
class PreparedDomain:
    """The rows every later step uses: cleaned as configured, dev/test carved where missing."""

    frames: dict[str, pd.DataFrame]  # train, dev, test: text, [text_pair], label (str), line (int)
    notes: list[str]
    unlabelled: list[str] | None  # the corpus after its cleaning; None when the domain has none
    steps: list[StepCount] = field(default_factory=list)  # rows/classes after each cleaning step
    split_status: dict[str, str] = field(default_factory=dict)  # dev/test: standard | carved | cleaned


@dataclass
class LoadedDomain:
    dataset: DatasetDict
    label_names: list[str]
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    has_pair: bool = False
    # The prepared unlabelled corpus when it came with the data (a snapshot carries it);
    # None: read it from the domain config (``load_unlabelled``) if a run needs it.
    unlabelled: list[str] | None = None


# --------------------------------------------------------------------------- reading


def _first_bad_utf8_line(data: bytes) -> tuple[int, str] | None:
    """The 1-based line of the first byte that is not UTF-8 (Arrow's reader names neither file nor line)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        return data.count(b"\n", 0, e.start) + 1, (
            f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {e.start - line_start + 1}); "
            "save the file as UTF-8"
        )
    return None


def _first_bad_json_line(path: str) -> tuple[int, str] | None:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return i, f"not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(obj, dict):
                return i, f"expected a JSON object, got {type(obj).__name__}"
    return None


def _local(location: str) -> str:
    """The local file holding ``location``'s bytes (a URL's content-addressed download)."""
    try:
        return local_copy(location)
    except DownloadError as e:
        raise DataError(str(e)) from None


def _read_table(location: str, fmt: str) -> pd.DataFrame:
    """Read one file through ``datasets.load_dataset`` (a URL from its downloaded copy, the
    bytes its snapshot id hashed); messages name ``location``."""
    path = _local(location)
    if not os.path.exists(path):
        raise DataError(f"{location}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{location}: is a directory; a split path must name a data file")
    try:
        data = Path(path).read_bytes()
    except PermissionError:
        raise DataError(f"{location}: cannot be read (permission denied)") from None
    if not data:
        raise DataError(f"{location}: file is empty")
    bad_text = _first_bad_utf8_line(data) if fmt != "parquet" else None
    if bad_text is not None:
        raise DataError(f"{location}: line {bad_text[0]}: {bad_text[1]}")
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[fmt]
    try:
        ds = load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # datasets wraps parser errors in several exception types
        if fmt in ("jsonl", "json"):
            bad = _first_bad_json_line(path)
            if bad is not None:
                raise DataError(f"{location}: line {bad[0]}: {bad[1]}") from None
            # Valid JSON whose columns change type between rows (e.g. a number among texts):
            # Arrow refuses it; read the objects as they are so validation can point at them.
            with open(path, encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            if not rows:
                raise DataError(f"{location}: no records") from None
            return pd.DataFrame.from_records(rows)
        raise DataError(f"{location}: could not be read as {fmt}: {e}") from None
    if ds.num_rows == 0:
        raise DataError(f"{location}: no records")
    return ds.to_pandas()


def _label_to_str(v: object) -> object:
    # Integers that pandas turned into floats (because of a null) come back as "3", not "3.0".
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return None
    return str(v)


def _select_columns(df: pd.DataFrame, cfg: DomainConfig, where: str) -> pd.DataFrame:
    wanted = {cfg.text_field: TEXT, cfg.label_field: LABEL}
    if cfg.text_pair_field:
        wanted[cfg.text_pair_field] = PAIR
    missing = [k for k in wanted if k not in df.columns]
    if missing:
        raise DataError(
            f"{where}: field(s) {missing} not found; the file has fields {sorted(map(str, df.columns))} "
            f"(set text_field/label_field/text_pair_field in the domain config)"
        )
    out = df[list(wanted)].rename(columns=wanted).copy()
    out[LABEL] = out[LABEL].map(_label_to_str).astype(object)
    return out.reset_index(drop=True)


def _source_lines(location: str, fmt: str, n_rows: int) -> tuple[list[int], str]:
    """Each row's 1-based physical line in its file, or its record number where there are no lines.

    The readers skip blank lines, so row i is not line i + 1 once a file has one; the lines are
    counted here, from the file itself, rather than inside the reader.
    """
    records = (list(range(1, n_rows + 1)), "record")
    if fmt == "parquet":
        return records
    lines: list[int] = []
    with open(_local(location), encoding="utf-8", errors="replace", newline="") as fh:
        if fmt == "csv":
            reader, end, header_seen = csv.reader(fh), 0, False
            for row in reader:
                start, end = end + 1, reader.line_num  # a quoted field may span lines: take its first
                if row and header_seen:
                    lines.append(start)
                header_seen = header_seen or bool(row)
        else:
            lines = [i for i, ln in enumerate(fh, start=1) if ln.strip()]
    # A JSON array, or a CSV the reader split differently: fall back to record numbers.
    return (lines, "line") if len(lines) == n_rows else records


def read_corpus(location: str) -> list[str]:
    """Every physical line of a plain-text corpus (blank lines kept, so index + 1 is the line)."""
    path = _local(location)
    if not os.path.exists(path):
        raise DataError(f"{location}: unlabelled corpus not found")
    data = Path(path).read_bytes()
    # Split on newlines only (not str.splitlines' form feeds and U+2028), as an editor numbers lines.
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    lines = []
    for i, part in enumerate(parts, start=1):
        try:
            lines.append(part.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{location}: line {i}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
    return lines


def read_raw(cfg: DomainConfig) -> RawDomain:
    frames: dict[str, pd.DataFrame] = {}
    sources: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for split, src in cfg.splits.items():
        location, fmt = cfg.resolve(src.path), src.resolved_format()
        df = _select_columns(_read_table(location, fmt), cfg, location)
        lines, kinds[split] = _source_lines(location, fmt, len(df))
        df[LINE] = lines
        frames[split], sources[split] = df, location
    corpus, corpus_source = None, None
    if cfg.unlabelled is not None:
        corpus_source = cfg.resolve(cfg.unlabelled.path)
        corpus = read_corpus(corpus_source)
    return RawDomain(frames=frames, sources=sources, has_pair=cfg.text_pair_field is not None, line_kind=kinds,
                     unlabelled=corpus, unlabelled_source=corpus_source)


def load_unlabelled(cfg: DomainConfig, src: SplitSource | None = None) -> list[str]:
    """The in-domain unlabelled corpus as prepared (``prepare``'s ``unlabelled``): one text per non-blank line."""
    src = src or cfg.unlabelled
    if src is None:
        return []
    return clean_corpus(read_corpus(cfg.resolve(src.path)), cfg.cleaning)[0]


# --------------------------------------------------------------------------- preparing


def _sort_labels(labels: Iterable[str]) -> list[str]:
    labels = sorted(set(labels))
    if all(re.fullmatch(r"-?\d+", x) for x in labels):
        return sorted(labels, key=int)  # "2" before "10"
    return labels


def label_names_for(cfg: DomainConfig, train: pd.DataFrame) -> list[str]:
    """The declared label set, else the sorted set of train labels (id -> name)."""
    return list(cfg.labels) if cfg.labels else _sort_labels(map(str, train[LABEL].dropna()))


def prepare(cfg: DomainConfig, raw: RawDomain) -> PreparedDomain:
    """Clean as configured, carve missing dev/test from train, drop leaked train rows; deterministic.

    Carving comes before leakage handling so rows of a carved dev/test are compared with train
    like a shipped split's; dev/test rows are never removed here unless ``cleaning.eval_splits``.
    """
    frames, notes, steps = clean_splits(raw.frames, cfg.cleaning)
    notes += carve(frames, cfg.split_spec, label_names_for(cfg, frames["train"]))
    notes += drop_leaked(frames, cfg.cleaning, steps)
    corpus = None
    if raw.unlabelled is not None:
        corpus, corpus_notes = clean_corpus(raw.unlabelled, cfg.cleaning)
        notes += corpus_notes
    frames = {s: frames[s] for s in SPLITS}
    return PreparedDomain(frames=frames, notes=notes, unlabelled=corpus, steps=steps,
                          split_status=split_status(raw.frames, frames))


# --------------------------------------------------------------------------- building


def fingerprint(frames: dict[str, pd.DataFrame]) -> str:
    h = hashlib.sha256()
    for split in sorted(frames):
        h.update(split.encode())
        cols = [c for c in (TEXT, PAIR, LABEL) if c in frames[split].columns]
        for row in frames[split][cols].itertuples(index=False):
            h.update(json.dumps([str(x) for x in row]).encode())
    return h.hexdigest()[:16]


def build_domain(cfg: DomainConfig, frames: dict[str, pd.DataFrame], notes: list[str] | None = None) -> LoadedDomain:
    """The dataset from prepared frames (all three splits present: ``prepare`` carves, this does not)."""
    missing = [s for s in SPLITS if s not in frames]
    if missing:
        raise DataError(f"{cfg.name}: split(s) {missing} missing: build from prepare()'s frames, which carve them")
    has_pair = cfg.text_pair_field is not None
    label_names = label_names_for(cfg, frames["train"])
    features = Features(
        {TEXT: Value("string"), **({PAIR: Value("string")} if has_pair else {}),
         LABEL: ClassLabel(names=label_names), "label_name": Value("string")}
    )
    parts = {}
    for split in SPLITS:
        df = frames[split]
        bad = df[~df[LABEL].isin(label_names)]
        if len(bad):
            raise DataError(
                f"{split}: {len(bad)} rows have labels outside {label_names}: "
                f"{sorted(set(map(str, bad[LABEL])))[:5]} (run `l3m validate` for the report)"
            )
        # A blank text in a standard dev/test split stays (it is part of the published split and
        # the model can still predict it); train must not have one, and no split a non-string.
        blank_ok = split != "train"
        nontext = df[TEXT].map(lambda t, ok=blank_ok: not isinstance(t, str) or (not ok and not t.strip()))
        if nontext.any():
            raise DataError(f"{split}: {int(nontext.sum())} rows have empty or non-string text "
                            "(set cleaning.drop_empty; run `l3m validate` for the lines)")
        cols = {TEXT: df[TEXT].tolist(), LABEL: [label_names.index(x) for x in df[LABEL]],
                "label_name": df[LABEL].tolist()}
        if has_pair:
            cols[PAIR] = df[PAIR].map(lambda t: t if isinstance(t, str) else "").tolist()
        parts[split] = Dataset.from_dict(cols, features=features)
    return LoadedDomain(dataset=DatasetDict(parts), label_names=label_names, notes=list(notes or []),
                        fingerprint=fingerprint(frames), has_pair=has_pair)


def load_domain(cfg: DomainConfig) -> LoadedDomain:
    """Read, prepare (clean + carve, as configured) and build. Validation is separate: ``l3m.data.validation``."""
    prepared = prepare(cfg, read_raw(cfg))
    return build_domain(cfg, prepared.frames, prepared.notes)


def encode_kwargs(max_length: int) -> dict[str, object]:
    """The one tokenization every step shares (scores, training and serving align on it)."""
    return {"truncation": True, "max_length": max_length}
