"""Selective Masking's store: computed once per key, recomputed when any input of the key changes,
never half-written, one computation when several processes ask at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from l3m.masking.selective import SelectiveStore

BASE = {"classifier_id": "stl-run:rows", "data_fingerprint": "data", "rate": 0.15, "delta": 0.0, "max_length": 128}


def _masks(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(n).astype(np.float32) for n in (5, 0, 9)]


class Counter:
    def __init__(self, seed: int = 0, wait: float = 0.0) -> None:
        self.calls, self.seed, self.wait = 0, seed, wait

    def __call__(self) -> list[np.ndarray]:
        self.calls += 1
        time.sleep(self.wait)
        return _masks(self.seed)


def test_reused_when_nothing_changed(tmp_path: Path):
    store, compute = SelectiveStore(tmp_path), Counter()
    key = store.key(**BASE)  # type: ignore[arg-type]
    first = store.get_or_compute(key, compute, expected=3)
    again = SelectiveStore(tmp_path).get_or_compute(store.key(**BASE), compute, expected=3)  # type: ignore[arg-type]
    assert compute.calls == 1
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)) and len(again[1]) == 0


@pytest.mark.parametrize("field,value", [("classifier_id", "other-run:rows"), ("data_fingerprint", "data2"),
                                         ("rate", 0.2), ("delta", 0.05), ("max_length", 64)])  # fmt: skip
def test_not_reused_when_any_input_changed(tmp_path: Path, field: str, value: object):
    store, compute = SelectiveStore(tmp_path), Counter()
    store.get_or_compute(store.key(**BASE), compute, expected=3)  # type: ignore[arg-type]
    changed = store.key(**{**BASE, field: value})  # type: ignore[arg-type]
    assert changed != store.key(**BASE)  # type: ignore[arg-type]
    store.get_or_compute(changed, compute, expected=3)
    assert compute.calls == 2


def test_a_selection_of_another_size_or_an_unreadable_file_is_recomputed(tmp_path: Path, caplog):
    store, compute = SelectiveStore(tmp_path), Counter()
    key = store.key(**BASE)  # type: ignore[arg-type]
    store.get_or_compute(key, compute, expected=3)
    store.get_or_compute(key, compute, expected=4)  # the rows changed under the same key: not trusted
    assert compute.calls == 2
    store.path(key).write_bytes(store.path(key).read_bytes()[:40])  # a copy cut short
    with caplog.at_level("WARNING", logger="l3m.selective"):
        assert store.get(key) is None
    assert "unreadable" in caplog.text
    store.get_or_compute(key, compute, expected=3)
    assert compute.calls == 3 and store.get(key) is not None


def test_concurrent_askers_compute_once(tmp_path: Path):
    store, compute = SelectiveStore(tmp_path), Counter(wait=0.3)
    key = store.key(**BASE)  # type: ignore[arg-type]
    results: list[list[np.ndarray]] = []
    threads = [threading.Thread(target=lambda: results.append(store.get_or_compute(key, compute, 3)))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compute.calls == 1 and len(results) == 3
    assert all(np.array_equal(a, b) for r in results for a, b in zip(r, results[0], strict=True))


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path: Path, monkeypatch):
    store = SelectiveStore(tmp_path)
    key = store.key(**BASE)  # type: ignore[arg-type]
    store.put(key, _masks(0))
    before = store.path(key).read_bytes()

    def disk_full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    with pytest.raises(OSError):
        store.put(key, _masks(1))
    assert store.path(key).read_bytes() == before  # the old selection is intact
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [store.path(key).name]
