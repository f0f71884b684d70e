"""The validated data snapshot: the one hand-off from validation to scoring, training and registration.

The validate step reads the raw files once, cleans and carves them (``loading.prepare``), runs
the checks, and — only if they pass — writes what it approved here: one Parquet file per split,
the unlabelled corpus, and a manifest (label mapping, majority class, raw/used row counts, the
cleaning notes, a content fingerprint). Every later step reads this directory instead of
re-reading and re-cleaning the sources, so all of them see the same rows.

A snapshot is immutable and content-addressed: its directory is named by a hash of the raw file
bytes, the domain config and the data-preparation code, so changed data or settings make a new
snapshot (and, through the fingerprint in every run's identity, new runs), while an unchanged
rerun finds the existing one and skips validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from l3m.config import DomainConfig, RunConfig
from l3m.data.loading import LABEL, PAIR, SPLITS, TEXT, DataError, LoadedDomain, PreparedDomain, build_domain
from l3m.data.remote import DownloadError, content_digest, is_url
from l3m.scoring.keys import file_digest

MANIFEST = "manifest.json"
SNAPSHOTS_DIR = "snapshots"
CORPUS_FILE = "unlabelled.parquet"
_DATA_CODE = Path(__file__).resolve().parent


def _digest_file(location: str) -> str:
    if is_url(location):
        # By content, not address: the file behind a URL can change (l3m.data.remote). Fetched
        # once per process, so the reader parses the bytes hashed here.
        try:
            return content_digest(location)
        except DownloadError as e:
            raise DataError(str(e)) from None
    p = Path(location)
    if not p.is_file():  # by name: reading it fails with its own message right after
        return "location:" + location
    try:
        return file_digest(p)  # the score keys' digest, cached per (path, size, mtime)
    except OSError:  # unreadable: reading the split next reports it with its own message
        return "unreadable:" + location


def code_digest() -> str:
    """The data-preparation code (reading, cleaning, carving, checks): a fix there re-validates."""
    h = hashlib.sha256()
    for f in sorted(_DATA_CODE.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def snapshot_id(cfg: DomainConfig) -> str:
    files: dict[str, str] = {split: _digest_file(cfg.resolve(src.path)) for split, src in sorted(cfg.splits.items())}
    if cfg.unlabelled is not None:
        files["unlabelled"] = _digest_file(cfg.resolve(cfg.unlabelled.path))
    # mlm_text changes what the MLM side reads, not the validated rows: runs carry it instead.
    blob = {"domain": cfg.model_dump(mode="json", exclude={"mlm_text"}), "files": files, "code": code_digest()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def snapshot_dir(cfg: RunConfig) -> Path:
    """Where the snapshot of ``cfg``'s domain data lives (it may not exist yet)."""
    return cfg.resolved_output_dir() / SNAPSHOTS_DIR / f"{cfg.domain.name}-{snapshot_id(cfg.domain)[:16]}"


def find_snapshot(cfg: RunConfig) -> Path | None:
    path = snapshot_dir(cfg)
    return path if (path / MANIFEST).is_file() else None


def write_snapshot(path: Path, cfg: DomainConfig, prepared: PreparedDomain, validation: dict[str, Any]) -> Path:
    """Write the approved data atomically (a finished directory appears, or nothing does)."""
    loaded = build_domain(cfg, prepared.frames, prepared.notes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        rows = {}
        for split in SPLITS:
            frame = loaded.dataset[split].to_pandas()
            frame = frame[[c for c in (TEXT, PAIR, "label_name") if c in frame.columns]]
            frame.to_parquet(tmp / f"{split}.parquet", index=False)
            rows[split] = len(frame)
        if prepared.unlabelled is not None:
            pd.DataFrame({TEXT: prepared.unlabelled}).to_parquet(tmp / CORPUS_FILE, index=False)
        train_names = pd.Series(loaded.dataset["train"]["label_name"])
        manifest = {
            "snapshot_id": path.name, "domain": cfg.name, "fingerprint": loaded.fingerprint,
            "label_names": loaded.label_names, "majority_label": str(train_names.value_counts().idxmax()),
            "text_pair": loaded.has_pair, "rows": rows, "split_status": prepared.split_status,
            "unlabelled_rows": None if prepared.unlabelled is None else len(prepared.unlabelled),
            "notes": loaded.notes, "validation": validation, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        try:
            os.rename(tmp, path)
        except OSError:  # another process wrote the same snapshot first: same content, keep it
            if not (path / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{path}: not a data snapshot (no {MANIFEST}); run `l3m validate` first")
    return dict(json.loads(p.read_text()))


def load_snapshot(path: str | Path) -> LoadedDomain:
    """The snapshot as the ``LoadedDomain`` training and scoring use (label ids from the manifest)."""
    path = Path(path)
    manifest = read_manifest(path)
    names = list(manifest["label_names"])
    has_pair = bool(manifest["text_pair"])
    features = Features({TEXT: Value("string"), **({PAIR: Value("string")} if has_pair else {}),
                         LABEL: ClassLabel(names=names), "label_name": Value("string")})
    parts = {}
    for split in SPLITS:
        frame = pd.read_parquet(path / f"{split}.parquet")
        frame[LABEL] = frame["label_name"].map(names.index)
        parts[split] = Dataset.from_pandas(frame[list(features)], features=features, preserve_index=False)
    corpus = path / CORPUS_FILE
    unlabelled = pd.read_parquet(corpus)[TEXT].tolist() if corpus.is_file() else None
    return LoadedDomain(dataset=DatasetDict(parts), label_names=names, notes=list(manifest["notes"]),
                        fingerprint=str(manifest["fingerprint"]), has_pair=has_pair, unlabelled=unlabelled)
