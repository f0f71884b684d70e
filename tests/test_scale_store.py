"""Shared stores written by several processes at once: the score store, the ledger, the lock.

Each test starts real OS processes (multiprocessing, spawn) that write the same store together,
the way two Prefect workers or Dask shards do, and checks nothing was lost or stored twice.
Spawned, not forked: a child forked from a pytest process that earlier ran Prefect flows
inherited their state and exited 1 before running its target.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from l3m.locking import exclusive
from l3m.scoring.store import ScoreStore
from serving.ledger import locked_ledger, read_ledger

KEY = "scorer-abc"
CTX = mp.get_context("spawn")


def _items(lo: int, hi: int) -> list[tuple[str, str | None]]:
    return [(f"text {i}", None if i % 2 else f"pair {i}") for i in range(lo, hi)]


def _scores(items: list[tuple[str, str | None]]) -> list[np.ndarray]:
    # Each item's scores are a function of the item, so any copy of it must be equal.
    return [np.full(len(t), float(len(t) + (len(p) if p else 0)), np.float32) for t, p in items]


def _writer(root: str, lo: int, hi: int, chunk: int, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))
    store = ScoreStore(root)
    items = _items(lo, hi)
    for i in range(0, len(items), chunk):
        part = items[i : i + chunk]
        store.put_many(KEY, part, _scores(part), meta={"who": "test"})


def _compactor(root: str, rounds: int, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))
    store = ScoreStore(root)
    for _ in range(rounds):
        store.compact(KEY)
        time.sleep(0.01)


def _stored_keys(root: Path) -> list[str]:
    keys: list[str] = []
    for part in (root / KEY).glob("part-*.parquet"):
        keys += pq.read_table(part).column("key").to_pylist()
    return keys


def test_concurrent_writers_and_compaction_lose_nothing_and_store_each_text_once(tmp_path):
    start = time.time() + 0.5
    # Three writers with overlapping ranges (texts 100-299 are written by two processes each)
    # and a compactor merging shards while they write.
    procs = [CTX.Process(target=_writer, args=(str(tmp_path), lo, hi, 7, start))
             for lo, hi in ((0, 200), (100, 300), (200, 400))]
    procs.append(CTX.Process(target=_compactor, args=(str(tmp_path), 30, start)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    keys = _stored_keys(tmp_path)
    assert len(keys) == len(set(keys)) == 400  # every text stored, none twice
    fresh = ScoreStore(tmp_path)
    items = _items(0, 400)
    got = fresh.get_many(KEY, items)
    assert all(g is not None and np.array_equal(g, s) for g, s in zip(got, _scores(items), strict=True))
    assert json.loads((tmp_path / KEY / "meta.json").read_text()) == {"who": "test"}


def test_put_of_already_stored_items_writes_no_shard(tmp_path):
    first, second = ScoreStore(tmp_path), ScoreStore(tmp_path)  # two processes' views of one store
    items = _items(0, 10)
    assert first.put_many(KEY, items, _scores(items)) is not None
    # The second view has not read the first one's shard yet, and still stores nothing twice.
    assert second.put_many(KEY, items[:5], _scores(items[:5])) is None
    more = _items(8, 14)
    written = second.put_many(KEY, more, _scores(more))
    assert written is not None and pq.read_table(written).num_rows == 4  # only texts 10-13 are new
    assert sorted(_stored_keys(tmp_path)) == sorted(set(_stored_keys(tmp_path)))


def test_reader_finds_scores_of_shards_merged_away_by_another_process(tmp_path):
    writer, reader = ScoreStore(tmp_path), ScoreStore(tmp_path)
    items = _items(0, 6)
    for i in range(0, 6, 2):
        writer.put_many(KEY, items[i : i + 2], _scores(items[i : i + 2]))
    assert reader.get_many(KEY, items[:2])[0] is not None  # the reader has seen all three shards
    more = _items(6, 8)
    writer.put_many(KEY, more, _scores(more))
    ScoreStore(tmp_path).compact(KEY)  # the shard the reader has not read yet is merged away
    assert all(g is not None for g in reader.get_many(KEY, _items(0, 8)))


def _increment(path: str, n: int, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))
    counter = Path(path)
    for _ in range(n):
        with exclusive(counter.with_suffix(".lock")):
            value = int(counter.read_text())
            time.sleep(0.001)  # widen the read-modify-write window a lost update needs
            counter.write_text(str(value + 1))


def test_exclusive_lock_serialises_processes(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    start = time.time() + 0.3
    procs = [CTX.Process(target=_increment, args=(str(counter), 40, start)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text() == "120"


def _ledger_writer(home: str, who: int, n: int, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))
    for i in range(n):
        with locked_ledger(Path(home)) as ledger:
            ledger["models"][f"l3m-d{who}:{i}"] = {"domain": f"d{who}", "stage": "candidate"}


def test_concurrent_ledger_writers_keep_every_entry_and_a_parseable_file(tmp_path):
    start = time.time() + 0.3
    procs = [CTX.Process(target=_ledger_writer, args=(str(tmp_path), w, 25, start)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ledger = read_ledger(tmp_path)  # parses: every write was a whole-file atomic replace
    assert len(ledger["models"]) == 75
