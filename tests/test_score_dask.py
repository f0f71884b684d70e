"""The score flow's shards on a local Dask cluster through prefect-dask's task runner (slow)."""

from __future__ import annotations

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_score_flow_on_a_local_dask_cluster(prefect_harness, toy_domain, tiny_mlm_dir, tmp_path):
    from flows.score import score_with_dask

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "domain": toy_domain(), "model": {"name_or_path": str(tiny_mlm_dir), "max_length": 32},
        "scoring": {"shard_size": 20, "store_dir": str(tmp_path / "scores"), "device": "cpu",
                    "shift_summary": True},  # all three splits: 90 texts over 5 shards
        "output_dir": str(tmp_path / "out"),
    }))
    flow = score_with_dask(n_workers=2)
    first = flow(str(cfg))
    assert sum(s["scored"] for s in first["splits"].values()) == 90
    assert first["tokens_scored"] > 0
    # Shards written by the workers land in the one store: a rerun (threads, this time) reads them all.
    from flows.score import score

    again = score(str(cfg))
    assert sum(s["cached"] for s in again["splits"].values()) == 90 and again["tokens_scored"] == 0
