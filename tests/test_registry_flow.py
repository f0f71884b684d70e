"""The Prefect `register` flow: registers, applies the promotion rule, publishes the decision."""

from __future__ import annotations

import pytest
from conftest_serving import build_tiny_model_dir, copy_with_dev


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_register_flow_promotes_better_and_refuses_worse(prefect_harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.register import register
    from serving import registry

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    base = build_tiny_model_dir(tmp_path / "base")
    first = register(str(copy_with_dev(base, tmp_path / "a", 0.5)))
    assert first["promoted"] and first["stage"] == "production"
    worse = register(str(copy_with_dev(base, tmp_path / "b", 0.45)), promote_margin=0.0)
    assert not worse["promoted"] and worse["stage"] == "candidate" and "below the bar" in worse["reason"]
    within_margin = register(str(copy_with_dev(base, tmp_path / "c", 0.52)), promote_margin=0.05)
    assert not within_margin["promoted"]
    assert registry.production_tag("citation_intent") == first["tag"]

    async def latest_artifact() -> str:
        async with get_client() as client:
            art = await client.read_latest_artifacts()
            return next(a.data for a in art if a.key == "registry-citation-intent")

    import asyncio

    assert within_margin["tag"] in asyncio.run(latest_artifact())
