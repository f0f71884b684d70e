"""Score store: per-token PLL scores as append-only Parquet shards, keyed by content hash.

Layout::

    <root>/<scorer_key>/meta.json                  what the key stands for (for people)
    <root>/<scorer_key>/part-<ns>-<uuid>.parquet    rows: key (sha256 of scorer key, text,
                                                    text_pair), scores (list<float32>)

Shards are never rewritten: ``put_many`` writes a new file (to a temporary name, then an atomic
rename), so a run killed mid-way leaves only whole shards and the rerun resumes from them. A
changed model or setting has a different scorer key, hence a separate directory: old scores are
never served for it. ``compact`` merges shards when there are many.

Several processes (workers, Dask shards, two pipelines of one domain) may share a store: writes
and compaction hold the key directory's ``.lock`` (``l3m.locking``), and ``put_many`` writes only
the items no shard holds yet, so a text scored by two processes at once is stored once. Reads
take no lock: shards appear by rename, and one removed by a concurrent ``compact`` is found again
in the merged shard.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from l3m.locking import exclusive
from l3m.scoring.keys import item_key

SCHEMA = pa.schema([("key", pa.string()), ("scores", pa.list_(pa.float32()))])
LOCK_FILE = ".lock"


class ScoreStore:
    """Look up and add scores; lookups read each shard once per process (an in-memory index)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._index: dict[str, dict[str, np.ndarray]] = {}
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def _dir(self, scorer_key: str) -> Path:
        if not scorer_key or "/" in scorer_key or scorer_key.startswith("."):
            raise ValueError(f"bad scorer key {scorer_key!r}")
        return self.root / scorer_key

    def _refresh(self, scorer_key: str) -> dict[str, np.ndarray]:
        """Load shards written since the last look (by this or another process)."""
        index = self._index.setdefault(scorer_key, {})
        seen = self._seen.setdefault(scorer_key, set())
        d = self._dir(scorer_key)
        while d.is_dir():
            vanished = False
            for part in sorted(d.glob("part-*.parquet")):
                if part.name in seen:
                    continue
                try:
                    table = pq.read_table(part, schema=SCHEMA)
                except FileNotFoundError:  # merged away by another process's compact: look again
                    vanished = True
                    continue
                keys = table.column("key").to_pylist()
                col = table.column("scores").combine_chunks()
                flat = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                offsets = col.offsets.to_numpy()
                for i, k in enumerate(keys):
                    index[k] = flat[offsets[i] : offsets[i + 1]]
                seen.add(part.name)
            if not vanished:
                break
        return index

    def get_many(self, scorer_key: str, items: Sequence[tuple[str, str | None]]) -> list[np.ndarray | None]:
        """Scores per item, or None for an item not scored under this key yet."""
        with self._lock:
            index = self._refresh(scorer_key)
            return [index.get(item_key(scorer_key, t, p)) for t, p in items]

    def put_many(
        self,
        scorer_key: str,
        items: Sequence[tuple[str, str | None]],
        scores: Sequence[np.ndarray],
        meta: dict[str, Any] | None = None,
    ) -> Path | None:
        """Append one shard holding these items' scores; returns its path (None when every item was
        already stored, by this or another process)."""
        if len(items) != len(scores):
            raise ValueError(f"{len(items)} items but {len(scores)} score arrays")
        if not items:
            return None
        keys = [item_key(scorer_key, t, p) for t, p in items]
        arrays = [np.asarray(s, dtype=np.float32) for s in scores]
        d = self._dir(scorer_key)
        d.mkdir(parents=True, exist_ok=True)
        with self._lock, exclusive(d / LOCK_FILE):
            meta_path = d / "meta.json"
            if meta and not meta_path.exists():
                _atomic_write(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
            # Under the lock, with every shard written so far loaded: keep only keys no shard
            # holds yet (another process may have scored the same texts meanwhile).
            index = self._refresh(scorer_key)
            new: dict[str, np.ndarray] = {}
            for k, a in zip(keys, arrays, strict=True):
                if k not in index:
                    new.setdefault(k, a)
            if not new:
                return None
            name = _write_shard(d, _table(list(new), list(new.values())))
            index.update(new)
            self._seen[scorer_key].add(name)
        return d / name

    def count(self, scorer_key: str) -> int:
        with self._lock:
            return len(self._refresh(scorer_key))

    def keys(self) -> list[str]:
        """Scorer keys present under the root."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def compact(self, scorer_key: str) -> int:
        """Merge all shards of a key into one (atomic swap); returns the number of rows kept."""
        d = self._dir(scorer_key)
        if not d.is_dir():
            return 0
        # The inter-process lock: a shard another process writes while the merged one is built
        # would otherwise be deleted without being merged.
        with self._lock, exclusive(d / LOCK_FILE):
            index = self._refresh(scorer_key)
            old = sorted(d.glob("part-*.parquet"))
            if len(old) <= 1:
                return len(index)
            keys = list(index)
            name = _write_shard(d, _table(keys, [index[k] for k in keys]))
            for p in old:
                p.unlink(missing_ok=True)
            self._seen[scorer_key] = {name}
        return len(keys)


def _table(keys: list[str], arrays: list[np.ndarray]) -> pa.Table:
    """Rows (key, scores) as one Arrow table; list offsets built directly, no per-row objects."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
    values = pa.array(np.concatenate(arrays) if arrays else np.zeros(0, np.float32), type=pa.float32())
    scores = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.table({"key": pa.array(keys, pa.string()), "scores": scores}, schema=SCHEMA)


def _write_shard(d: Path, table: pa.Table) -> str:
    """Write to a hidden temporary name, then rename: readers never see a partial shard."""
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = d / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, d / name)
    return name


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
