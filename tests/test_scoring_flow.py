"""The Prefect ``score`` flow: scores a domain into the store, reruns from it, scores only new texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import l3m.scoring.api as api
from l3m.scoring import ScoreStore
from tests.test_scoring import one_thread, tiny_model_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_score_flow_store_rerun_and_new_texts(prefect_harness, toy_domain, tiny_model_dir, one_thread,  # noqa: F811
                                              tmp_path: Path, monkeypatch):  # fmt: skip
    from flows.score import score

    monkeypatch.setattr(api, "_SCORERS", {})
    real_get_scorer = api.get_scorer
    cfg = {
        "domain": toy_domain(),
        "model": {"name_or_path": str(tiny_model_dir), "max_length": 32},
        "scoring": {"shard_size": 16, "store_dir": str(tmp_path / "scores"), "device": "cpu",
                    "shift_summary": True},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))

    first = score(str(path))
    splits = first["splits"]
    assert set(splits) == {"train", "dev", "test"}
    assert splits["train"]["texts"] == 60 and splits["train"]["scored"] == 60
    assert first["tokens_scored"] > 0 and splits["dev"]["mean_logp"] < 0
    store = ScoreStore(tmp_path / "scores")
    assert store.count(first["scorer_key"]) == 90
    artifact = _latest_artifact("scores-toy")
    assert "mean log p" in artifact and "| train | 60 | 0 | 60 |" in artifact
    # Model time of the shards (they share one scorer, so it never exceeds the phase's wall clock).
    assert 0 < first["seconds"] <= first["wall_seconds"] and "s end to end" in artifact
    # The summary says which scoring path ran, and why.
    assert first["path"] == "packed" and "BERT-layout" in first["path_reason"]
    assert "scoring path: packed (BertForMaskedLM: BERT-layout" in artifact

    def no_model(*a, **k):
        raise AssertionError("an already-scored domain must not load a model")

    monkeypatch.setattr(api, "get_scorer", no_model)
    again = score(str(path))
    assert all(s["scored"] == 0 and s["cached"] == s["texts"] for s in again["splits"].values())
    assert again["tokens_scored"] == 0 and again["path"] is None and "from the store" in again["path_reason"]

    monkeypatch.setattr(api, "get_scorer", real_get_scorer)
    train = toy_domain.root / "toy" / "train.jsonl"
    rows = [{"text": f"fresh sentence {i} good great", "label": "pos"} for i in range(10)]
    with open(train, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    third = score(str(path))
    assert third["splits"]["train"]["scored"] == 10 and third["splits"]["train"]["cached"] == 60
    assert third["splits"]["dev"]["scored"] == 0 == third["splits"]["test"]["scored"]
    assert store.count(first["scorer_key"]) == 100


def test_score_flow_scores_only_what_the_runs_read(prefect_harness, toy_domain, tiny_model_dir, one_thread,  # noqa: F811
                                                  tmp_path: Path):
    from flows.score import score
    from l3m.experiment import needed_train_rows

    cfg = {
        "domain": toy_domain(),
        "model": {"name_or_path": str(tiny_model_dir), "max_length": 32},
        "scoring": {"store_dir": str(tmp_path / "scores"), "device": "cpu"},
        "strategies": [{"kind": "none"}, {"kind": "l3"}],
        "training": {"train_limit": 20, "seeds": [1, 2]},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = score(str(path))
    from l3m.config import load_config

    wanted = len(needed_train_rows(load_config(path), 60))
    assert 20 < wanted < 60  # two seeds' subsamples overlap, and leave rows out
    assert set(out["splits"]) == {"train"} and out["splits"]["train"]["texts"] == wanted
    assert any("training.train_limit=20" in line for line in out["scope"])
    assert any(line.startswith("dev/test: not scored") for line in out["scope"])
    assert "- dev/test: not scored" in _latest_artifact("scores-toy")

    cfg["strategies"] = [{"kind": "none"}, {"kind": "random"}]  # nothing reads vanilla scores
    path.write_text(yaml.safe_dump(cfg))
    none = score(str(path))
    assert none["splits"] == {} and none["tokens_scored"] == 0
    assert any("no strategy in this config reads vanilla scores" in line for line in none["scope"])


def _latest_artifact(key: str) -> str:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> str:
        async with get_client() as client:
            arts = await client.read_latest_artifacts()
            return next(a.data for a in arts if a.key == key)

    return asyncio.run(read())
