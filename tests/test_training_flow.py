"""The Prefect ``train`` flow end to end: real scoring (tiny model) -> STL and L3 runs -> table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_training import tiny_model  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_train_flow_scores_trains_and_tabulates(prefect_harness, toy_domain, tiny_model, tmp_path: Path):  # noqa: F811
    from flows.train import train

    cfg = {
        "domain": toy_domain(),
        "model": {"name_or_path": str(tiny_model), "max_length": 32},
        "scoring": {"store_dir": str(tmp_path / "scores"), "device": "cpu"},
        "strategies": [{"kind": "none"}, {"kind": "l3"}],
        "training": {"max_steps": 4, "batch_size": 8, "seeds": [1], "fp16_on_cuda": False},
        "output_dir": str(tmp_path / "exp"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = train(str(path))
    assert out["prepared"]["score_key"] and Path(out["prepared"]["tokenview"]).exists()
    assert [(r["strategy"], r["seed"]) for r in out["runs"]] == [("none", 1), ("l3", 1)]
    assert abs(out["runs"][1]["realised_rate"] - 0.15) < 0.08
    table = Path(out["results"]["md"]).read_text()
    assert "| STL | full | 1 |" in table and "| L3 | full | 1 |" in table
    meta = json.loads((Path(out["runs"][1]["model_dir"]) / "l3m.json").read_text())
    assert meta["score_key"] == out["prepared"]["score_key"]
