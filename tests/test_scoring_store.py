"""Score store and score_texts: resume, invalidation, no forward pass on rerun, only new texts scored."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import l3m.scoring.api as api
from l3m.scoring import PLLScorer, ScoreStats, ScoreStore, score_texts, scorer_key
from tests.test_scoring import one_thread, tiny_model_dir  # noqa: F401  (fixtures)

ITEMS = [(f"text number {i} about parsing and tagging", None) for i in range(6)] + [("a text", "with a pair")]


@pytest.fixture
def tiny(tiny_model_dir: Path, one_thread, monkeypatch) -> Path:  # noqa: F811
    monkeypatch.setattr(api, "_SCORERS", {})  # each test counts its own model loads
    return tiny_model_dir


def test_store_roundtrip_and_resume_from_disk(tmp_path: Path):
    store = ScoreStore(tmp_path)
    key = "m.within_word_l2r.L128.exact.0123456789abcdef"
    arrays = [
        np.array([np.nan, -1.5, -2.0, np.nan], np.float32),
        np.array([np.nan, -0.25, np.nan], np.float32),
    ]
    items = [("a", None), ("a", "b")]
    assert store.get_many(key, items) == [None, None]
    store.put_many(key, items, arrays)
    # A leftover temporary file of an interrupted write is never read as a shard.
    (tmp_path / key / ".part-x.parquet.tmp").write_bytes(b"garbage")
    fresh = ScoreStore(tmp_path)  # a new process: reads the shards from disk
    got = fresh.get_many(key, items + [("b", None)])
    assert got[2] is None
    for g, a in zip(got[:2], arrays, strict=True):
        assert g is not None and g.dtype == np.float32
        np.testing.assert_array_equal(g, a)
    assert fresh.get_many("other.key", items) == [None, None]
    store.put_many(key, [("c", None)], [np.array([np.nan], np.float32)])
    assert fresh.count(key) == 3  # shards written by another store object are picked up
    assert fresh.compact(key) == 3 and len(list((tmp_path / key).glob("part-*.parquet"))) == 1
    assert ScoreStore(tmp_path).count(key) == 3


def test_scorer_key_invalidates_on_model_tokenizer_and_settings(tiny: Path, tmp_path: Path):
    base = scorer_key(str(tiny), None, "within_word_l2r", 128, "exact", 4)
    assert base == scorer_key(str(tiny), None, "within_word_l2r", 128, "exact", 8)  # stride: strided only
    others = {
        scorer_key(str(tiny), None, "original", 128, "exact", 4),
        scorer_key(str(tiny), None, "within_word_l2r", 64, "exact", 4),
        scorer_key(str(tiny), None, "within_word_l2r", 128, "strided", 4),
        scorer_key(str(tiny), None, "within_word_l2r", 128, "strided", 8),
    }
    assert base not in others and len(others) == 4
    changed = tmp_path / "changed"
    shutil.copytree(tiny, changed)
    same_name = scorer_key(str(changed), None, "within_word_l2r", 128, "exact", 4)
    assert same_name.split(".")[-1] == base.split(".")[-1]  # same bytes, same hash
    from safetensors.torch import load_file, save_file

    weights = load_file(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert (
        scorer_key(str(changed), None, "within_word_l2r", 128, "exact", 4).split(".")[-1]
        != base.split(".")[-1]
    )
    tok_changed = tmp_path / "tok"
    shutil.copytree(tiny, tok_changed)
    with open(tok_changed / "tokenizer_config.json", "a") as fh:
        fh.write("\n")
    assert scorer_key(str(tok_changed), None, "within_word_l2r", 128, "exact", 4) != base


def test_rerun_does_no_forward_pass_and_new_texts_only_are_scored(tiny: Path, tmp_path: Path, monkeypatch):
    store = ScoreStore(tmp_path)
    kw = {"model": str(tiny), "metric": "within_word_l2r", "max_length": 64, "device": "cpu", "store": store}
    first = score_texts(ITEMS, **kw)
    assert len(first) == len(ITEMS)

    # Rerun: everything comes from the store; no model is even built.
    def no_model(*a, **k):
        raise AssertionError("rerun must not load a model")

    monkeypatch.setattr(api, "get_scorer", no_model)
    st = ScoreStats()
    again = score_texts(ITEMS, stats=st, **kw)
    assert st.cached == len(ITEMS) and st.scored == 0
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)

    # Ten new texts among the old ones: exactly those ten go through the model.
    monkeypatch.undo()
    monkeypatch.setattr(api, "_SCORERS", {})
    new = [(f"brand new sentence {i} with words", None) for i in range(10)]
    st = ScoreStats()
    out = score_texts(ITEMS + new, stats=st, **kw)
    scorer = next(iter(api._SCORERS.values()))
    assert st.scored == 10 and st.cached == len(ITEMS)
    encs = scorer.encode(new, 64)
    assert scorer.stats.copies == sum(e.n_targets for e in encs)  # only their masked copies ran
    for a, b in zip(out[: len(ITEMS)], first, strict=True):
        np.testing.assert_array_equal(a, b)


def test_interrupted_run_resumes(tiny: Path, tmp_path: Path, monkeypatch):
    store = ScoreStore(tmp_path)
    monkeypatch.setattr(api, "FLUSH_TEXTS", 2)  # one shard per 2 texts
    scorer = PLLScorer(str(tiny), device="cpu")
    calls = {"n": 0}
    real = scorer.score_encoded

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(scorer, "score_encoded", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        score_texts(ITEMS, model=scorer, max_length=64, store=store)
    key = scorer_key(str(tiny), None, "within_word_l2r", 64, "exact", 4)
    assert ScoreStore(tmp_path).count(key) == 4  # two finished shards survived
    st = ScoreStats()
    monkeypatch.setattr(scorer, "score_encoded", real)
    out = score_texts(ITEMS, model=scorer, max_length=64, store=ScoreStore(tmp_path), stats=st)
    assert st.cached == 4 and st.scored == len(ITEMS) - 4
    ref = PLLScorer(str(tiny), device="cpu").score(ITEMS, max_length=64)
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, equal_nan=True)


def test_duplicate_texts_scored_once(tiny: Path):
    st = ScoreStats()
    seen: list[tuple[int, int]] = []
    items = [("same text", None)] * 3 + [("other", None)]
    out = score_texts(
        items, model=str(tiny), device="cpu", stats=st, progress=lambda d, n: seen.append((d, n))
    )
    assert st.scored == 2 and len(out) == 4
    assert seen[-1] == (4, 4) and all(n == 4 for _, n in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # monotone
    assert out[0] is out[1] is out[2]
    assert torch.get_num_threads() == 1  # the fixture's setting held


def test_model_time_excludes_waiting_for_a_shared_scorer(tiny: Path):
    """Two flow shards share one scorer; a shard's seconds must not count the other's forward."""
    import threading
    import time

    scorer = PLLScorer(str(tiny), device="cpu")
    hold = 0.6
    started = threading.Event()

    def busy() -> None:  # stands in for the other shard's forward pass
        with scorer._lock:
            started.set()
            time.sleep(hold)

    other = threading.Thread(target=busy)
    other.start()
    started.wait()
    st = ScoreStats()
    t0 = time.perf_counter()
    score_texts(ITEMS[:2], model=scorer, stats=st, max_length=32)
    waited = time.perf_counter() - t0
    other.join()
    assert waited >= hold  # it did wait for the lock ...
    assert 0 < st.seconds < waited - hold / 2  # ... and its model time leaves the wait out
    assert st.seconds == pytest.approx(scorer.last_seconds)


def test_a_hub_id_is_keyed_by_the_commit_its_revision_resolves_to(tmp_path: Path, monkeypatch):
    """Offline, loading takes the cached ref's commit: so does the key. A new commit on the ref gives
    a new key, an unchanged ref the same key; no environment variable relabels it."""
    from huggingface_hub import constants

    import l3m.scoring.keys as keys

    keys.hub_commit.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    refs = tmp_path / "models--owner--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)

    def key(rev: str | None = None) -> str:
        return scorer_key("owner/model", rev, "within_word_l2r", 128)

    first = key()
    assert key() == first  # reused when nothing changed
    monkeypatch.setenv("L3M_HUB_REVISION", "v2")
    assert key() == first  # an environment label that loading never reads changes nothing
    (refs / "main").write_text("b" * 40)  # a new commit on main
    keys.hub_commit.cache_clear()  # asked once per run: the next run (its validation clears it) asks again
    assert key() != first
    assert key("a" * 40) == first  # the commit pinned explicitly: the same model as before
    (refs / "main").unlink()
    keys.hub_commit.cache_clear()
    assert key() not in (first, key("b" * 40))  # not cached, offline: "unresolved", its own key


def test_scoring_code_is_pinned_with_the_scoring_version():
    """A change to the scoring modules fails here until SCORING_VERSION is bumped (scores differ) or
    the digest re-pinned (they do not): the message says how."""
    from l3m.scoring.keys import scoring_code_drift

    drift = scoring_code_drift()
    assert drift is None, drift


def test_the_score_key_carries_the_scoring_version_and_the_digest_sees_code_only(tiny: Path, tmp_path: Path,
                                                                                  monkeypatch):
    import l3m.scoring.keys as keys

    before = scorer_key(str(tiny), None, "within_word_l2r", 128)
    assert scorer_key(str(tiny), None, "within_word_l2r", 128) == before
    monkeypatch.setattr(keys, "SCORING_VERSION", keys.SCORING_VERSION + 1)
    assert scorer_key(str(tiny), None, "within_word_l2r", 128) != before  # stored scores recompute
    root = tmp_path / "scoring"
    shutil.copytree(Path(keys.__file__).parent, root)
    assert keys.scoring_code_drift(root) is not None  # the bumped version is not the pinned one
    monkeypatch.setattr(keys, "SCORING_VERSION", keys.SCORING_CODE["version"])
    assert keys.scoring_code_drift(root) is None
    plans = root / "plans.py"
    text = plans.read_text()
    plans.write_text(text.replace('"""Word ids from', '"""Reworded: word ids from', 1) + "\n# a comment\n")
    assert keys.scoring_code_drift(root) is None
    plans.write_text(text.replace("if word < 0 or", "if word <= 0 or", 1))
    assert "bump SCORING_VERSION" in (keys.scoring_code_drift(root) or "")


def test_a_hub_commit_is_asked_once_per_run(tmp_path: Path, monkeypatch):
    """Planning takes many run identities: one lookup, and a new commit mid-run does not split the plan."""
    from huggingface_hub import HfApi, constants

    import l3m.scoring.keys as keys

    calls: list[str] = []

    class Info:
        sha = "c" * 40

    def model_info(self: object, repo_id: str, **_: object) -> Info:
        calls.append(repo_id)
        return Info()

    keys.hub_commit.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    first = {scorer_key("owner/model", None, "within_word_l2r", 128) for _ in range(5)}
    Info.sha = "d" * 40  # main moves while the run plans
    assert {scorer_key("owner/model", None, "within_word_l2r", 128) for _ in range(5)} == first
    assert calls == ["owner/model"]
    keys.hub_commit.cache_clear()  # the next run
    assert scorer_key("owner/model", None, "within_word_l2r", 128) not in first
    keys.hub_commit.cache_clear()
