"""Load a domain's splits into a ``datasets.DatasetDict`` with a stable label mapping.

Reading is two-staged on purpose: ``read_raw`` returns the splits as they are on disk (as
pandas frames, values untouched) so validation can report the real problems; ``build_domain``
applies the configured cleaning and turns the frames into the dataset every later step uses.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from datasets import config as datasets_config

from l3m.config import CleaningSpec, DomainConfig, SplitSource

SPLITS = ("train", "dev", "test")
TEXT, PAIR, LABEL = "text", "text_pair", "label"


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, and the line where known."""


@dataclass
class RawDomain:
    """Splits as read from disk, normalised only in column names (text/text_pair/label)."""

    frames: dict[str, pd.DataFrame]
    sources: dict[str, str]
    has_pair: bool


@dataclass
class LoadedDomain:
    dataset: DatasetDict
    label_names: list[str]
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    has_pair: bool = False


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


def _read_table(location: str, fmt: str) -> pd.DataFrame:
    """Read one file through ``datasets.load_dataset`` (local path or URL)."""
    is_url = "://" in location
    if is_url and datasets_config.HF_HUB_OFFLINE:
        raise DataError(f"{location}: a URL, but offline mode is on (HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1); "
                        "download the file and give its local path, or turn offline mode off")
    if not is_url:
        if not os.path.exists(location):
            raise DataError(f"{location}: file not found")
        if os.path.isdir(location):
            raise DataError(f"{location}: is a directory; a split path must name a data file")
        try:
            data = Path(location).read_bytes()
        except PermissionError:
            raise DataError(f"{location}: cannot be read (permission denied)") from None
        if not data:
            raise DataError(f"{location}: file is empty")
        bad_text = _first_bad_utf8_line(data) if fmt != "parquet" else None
        if bad_text is not None:
            raise DataError(f"{location}: line {bad_text[0]}: {bad_text[1]}")
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[fmt]
    try:
        ds = load_dataset(builder, data_files=location, split="train")
    except Exception as e:  # datasets wraps parser errors in several exception types
        if fmt in ("jsonl", "json") and not is_url:
            bad = _first_bad_json_line(location)
            if bad is not None:
                raise DataError(f"{location}: line {bad[0]}: {bad[1]}") from None
            # Valid JSON whose columns change type between rows (e.g. a number among texts):
            # Arrow refuses it; read the objects as they are so validation can point at them.
            with open(location, encoding="utf-8") as fh:
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


def read_raw(cfg: DomainConfig) -> RawDomain:
    frames: dict[str, pd.DataFrame] = {}
    sources: dict[str, str] = {}
    for split, src in cfg.splits.items():
        location = cfg.resolve(src.path)
        frames[split] = _select_columns(_read_table(location, src.resolved_format()), cfg, location)
        sources[split] = location
    return RawDomain(frames=frames, sources=sources, has_pair=cfg.text_pair_field is not None)


def load_unlabelled(cfg: DomainConfig, src: SplitSource | None = None) -> list[str]:
    """The in-domain unlabelled corpus: one text per non-blank line."""
    src = src or cfg.unlabelled
    if src is None:
        return []
    location = cfg.resolve(src.path)
    if not os.path.exists(location):
        raise DataError(f"{location}: unlabelled corpus not found")
    return [ln.strip() for ln in Path(location).read_text(encoding="utf-8").splitlines() if ln.strip()]


# --------------------------------------------------------------------------- cleaning

_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_SPACE = re.compile(r"\s+")


def _unescape(text: object) -> object:
    if not isinstance(text, str):
        return text
    return _SPACE.sub(" ", _TAG.sub(" ", html.unescape(text))).strip()


def clean(raw: RawDomain, spec: CleaningSpec) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Apply the configured repairs; return the frames and a note per repair that changed rows."""
    frames = {k: v.copy() for k, v in raw.frames.items()}
    notes: list[str] = []
    text_cols = [TEXT, PAIR] if raw.has_pair else [TEXT]
    for split, df in frames.items():
        if spec.unescape_html:
            before = df[TEXT].copy()
            for col in text_cols:
                df[col] = df[col].map(_unescape)
            changed = int((before != df[TEXT]).sum())
            if changed:
                notes.append(f"{split}: unescaped HTML in {changed} texts")
        if spec.drop_empty:
            blank = df[text_cols].map(lambda t: not isinstance(t, str) or not t.strip()).any(axis=1)
            blank |= df[LABEL].isna()
            if blank.any():
                notes.append(f"{split}: dropped {int(blank.sum())} rows with empty/null text or label")
                df = df[~blank]
        if spec.dedupe:
            keys = [c for c in (TEXT, PAIR) if c in df.columns]
            labels_per_text = df.groupby(keys, dropna=False)[LABEL].transform("nunique")
            conflicting = labels_per_text > 1
            n_before = len(df)
            df = df[~conflicting].drop_duplicates(subset=[*keys, LABEL])
            if n_before != len(df):
                notes.append(
                    f"{split}: dedupe removed {n_before - len(df)} rows "
                    f"({int(conflicting.sum())} with conflicting labels)"
                )
        frames[split] = df.reset_index(drop=True)
    if spec.drop_leaked_from_train and "train" in frames:
        held_out = set()
        for split in ("dev", "test"):
            if split in frames:
                held_out |= set(frames[split][TEXT].astype(str))
        leaked = frames["train"][TEXT].astype(str).isin(held_out)
        if leaked.any():
            notes.append(f"train: dropped {int(leaked.sum())} rows whose text also appears in dev/test")
            frames["train"] = frames["train"][~leaked].reset_index(drop=True)
    return frames, notes


# --------------------------------------------------------------------------- building


def _sort_labels(labels: Iterable[str]) -> list[str]:
    labels = sorted(set(labels))
    if all(re.fullmatch(r"-?\d+", x) for x in labels):
        return sorted(labels, key=int)  # "2" before "10"
    return labels


def fingerprint(frames: dict[str, pd.DataFrame]) -> str:
    h = hashlib.sha256()
    for split in sorted(frames):
        h.update(split.encode())
        cols = [c for c in (TEXT, PAIR, LABEL) if c in frames[split].columns]
        for row in frames[split][cols].itertuples(index=False):
            h.update(json.dumps([str(x) for x in row]).encode())
    return h.hexdigest()[:16]


def build_domain(cfg: DomainConfig, frames: dict[str, pd.DataFrame], notes: list[str] | None = None) -> LoadedDomain:
    notes = list(notes or [])
    has_pair = cfg.text_pair_field is not None
    train_labels = frames["train"][LABEL].dropna()
    label_names = list(cfg.labels) if cfg.labels else _sort_labels(train_labels)
    features = Features(
        {TEXT: Value("string"), **({PAIR: Value("string")} if has_pair else {}),
         LABEL: ClassLabel(names=label_names), "label_name": Value("string")}
    )
    parts = {}
    for split, df in frames.items():
        bad = df[~df[LABEL].isin(label_names)]
        if len(bad):
            raise DataError(
                f"{split}: {len(bad)} rows have labels outside {label_names}: "
                f"{sorted(set(map(str, bad[LABEL])))[:5]} (run `l3m validate` for the report)"
            )
        nontext = df[TEXT].map(lambda t: not isinstance(t, str) or not t.strip())
        if nontext.any():
            raise DataError(f"{split}: {int(nontext.sum())} rows have empty or non-string text (set cleaning.drop_empty)")
        cols = {TEXT: df[TEXT].tolist(), LABEL: [label_names.index(x) for x in df[LABEL]],
                "label_name": df[LABEL].tolist()}
        if has_pair:
            cols[PAIR] = df[PAIR].map(lambda t: t if isinstance(t, str) else "").tolist()
        parts[split] = Dataset.from_dict(cols, features=features)
    ds = DatasetDict(parts)
    fp = fingerprint(frames)
    # Missing evaluation splits are carved from train, stratified and seeded so reruns agree.
    spec = cfg.split_spec
    for split, frac in (("test", spec.test_fraction), ("dev", spec.dev_fraction)):
        if split in ds:
            continue
        n_before = ds["train"].num_rows
        try:
            parted = ds["train"].train_test_split(test_size=frac, seed=spec.seed, stratify_by_column=LABEL)
            how = "stratified"
        except ValueError:  # a class with a single example cannot be stratified
            parted = ds["train"].train_test_split(test_size=frac, seed=spec.seed)
            how = "random (a class was too small to stratify)"
        ds["train"], ds[split] = parted["train"], parted["test"]
        notes.append(f"{split}: missing, carved {ds[split].num_rows} of {n_before} train rows ({how}, seed {spec.seed})")
    ds = DatasetDict({k: ds[k] for k in SPLITS})
    return LoadedDomain(dataset=ds, label_names=label_names, notes=notes, fingerprint=fp, has_pair=has_pair)


def load_domain(cfg: DomainConfig) -> LoadedDomain:
    """Read, clean (as configured) and build. Validation is separate: ``l3m.data.validation``."""
    raw = read_raw(cfg)
    frames, notes = clean(raw, cfg.cleaning)
    return build_domain(cfg, frames, notes)


def encode_kwargs(max_length: int) -> dict[str, object]:
    """The one tokenization every step shares (scores, training and serving align on it)."""
    return {"truncation": True, "max_length": max_length}
