"""The multi-domain service over HTTP (real `bentoml serve`): a weight_mask and a lora domain
over one base, the domain field, metadata per domain, and registry promotions, a rollback and
a new domain reaching the running service under concurrent requests with no failed request."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest_serving import bentoml_server, offline_predictions
from test_multi_domain import TEXTS, _as_domain, _register, trained  # noqa: F401  (fixture reused)
from test_serving import ROOT, SERVER_ENV, env, server_log  # noqa: F401  (fixture reused)


@pytest.fixture(scope="module")
def home(tmp_path_factory, trained) -> Path:  # noqa: F811
    h = tmp_path_factory.mktemp("multi-home")
    for d in trained.values():
        _register(h, d)
    return h


@pytest.fixture(scope="module")
def url(home, server_log) -> Iterator[str]:  # noqa: F811
    server_env = os.environ | SERVER_ENV | {"BENTOML_HOME": str(home), "L3M_DOMAINS": "*", "L3M_RELOAD_S": "0.5"}
    with bentoml_server("serving.multi_service:L3MDomains", ROOT, server_env, server_log) as (u, _):
        yield u


def test_metadata_lists_every_domain_with_version_labels_and_tuner(url):
    meta = httpx.get(f"{url}/metadata").json()
    got = {d["domain"]: (d["tuner"], d["labels"], d["version"]) for d in meta["domains"]}
    assert set(got) == {"wm_a", "lora_b"}
    assert got["wm_a"][0] == "weight_mask" and got["lora_b"][0] == "lora"
    assert all(sorted(labels) == ["neg", "pos"] and version for _, labels, version in got.values())


def test_each_domain_answers_with_its_offline_predictions(url, trained):  # noqa: F811
    for domain, model_dir in trained.items():
        got = httpx.post(f"{url}/classify", json={"texts": TEXTS, "domain": domain}).json()
        want = offline_predictions(model_dir, TEXTS)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want, strict=True):
            assert g["score"] == pytest.approx(w["probabilities"][g["label"]], abs=1e-5)


def test_domain_is_required_with_several_and_an_unknown_one_is_a_404_naming_the_served(url):
    r = httpx.post(f"{url}/classify", json={"texts": TEXTS})
    assert r.status_code == 400 and "name one in 'domain'" in r.json()["error"]
    r = httpx.post(f"{url}/classify", json={"texts": TEXTS, "domain": "nope"})
    assert r.status_code == 404 and set(r.json()["domains"]) >= {"wm_a", "lora_b"}
    assert "'nope' is not served" in r.json()["error"]
    r = httpx.post(f"{url}/classify", json={"texts": [["a", "b"]], "domain": "wm_a"})
    assert r.status_code == 400 and "takes plain texts" in r.json()["error"]


def _tag_of(url: str, domain: str) -> str | None:
    return next((d["model_tag"] for d in httpx.get(f"{url}/metadata").json()["domains"] if d["domain"] == domain), None)


def _wait_for(url: str, domain: str, tag: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _tag_of(url, domain) != tag:
        assert time.monotonic() < deadline, f"{domain} still at {_tag_of(url, domain)}, not {tag}"
        time.sleep(0.2)


def test_promotion_rollback_and_new_domain_reach_the_running_service_with_no_failed_request(
        url, home, trained, tmp_path, server_log):  # noqa: F811
    from serving import registry

    old = _tag_of(url, "lora_b")
    statuses: list[int] = []
    stop = threading.Event()

    def client(domain: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                statuses.append(c.post("/classify", json={"texts": TEXTS, "domain": domain}).status_code)

    threads = [threading.Thread(target=client, args=(d,)) for d in ("lora_b", "wm_a") * 3]
    for t in threads:
        t.start()
    try:
        new = _register(home, _as_domain(trained["lora_b"], tmp_path / "v2", "lora_b", dev=0.99))
        _wait_for(url, "lora_b", new)
        with env(BENTOML_HOME=str(home)):
            registry.rollback("lora_b")
        _wait_for(url, "lora_b", old or "")
        added = _register(home, _as_domain(trained["wm_a"], tmp_path / "c", "wm_c"))
        _wait_for(url, "wm_c", added)
        r = httpx.post(f"{url}/classify", json={"texts": TEXTS, "domain": "wm_c"})
        assert r.status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) > 20 and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    log = server_log.read_text()
    assert f"domain lora_b: {old} -> {new}" in log and f"domain lora_b: {new} -> {old}" in log
    assert f"domain wm_c: (new) -> {added}" in log
    # Every version above (4 of 3 domains) has the same tokenizer files: one set of lanes for all.
    assert log.count("tokenizer lanes for ") == 1
