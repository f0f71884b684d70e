"""Many domains in one process (serving.domains, serving.batcher keys): compact domains over one
resident base, served == offline, fair batching by domain, and registry promotions swapped in
under concurrent requests without a failure."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest_serving import offline_predictions
from test_compact_serving import train_compact
from test_serving import env

from serving.batcher import MicroBatcher, Overloaded
from serving.domains import DomainSet, Served, UnknownDomain
from serving.model_io import predict_encoded
from serving.textbound import encode_inputs

TEXTS = ["good great fine item x", "awful poor bad item y", "lovely dreadful item z"]


# --- batching by domain -----------------------------------------------------------------------


def test_batches_hold_one_domain_and_a_heavy_domain_does_not_starve_a_light_one():
    calls: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        time.sleep(0.01)
        calls.append(items)
        return items

    async def main() -> list[str]:
        batcher = MicroBatcher(run, max_batch_texts=8, max_queue_texts=10_000)
        heavy = [asyncio.create_task(batcher.submit([f"h{i}"] * 8, key="heavy")) for i in range(20)]
        await asyncio.sleep(0)  # the heavy queue is deep before the light request arrives
        light = await batcher.submit(["l0"], key="light")
        await asyncio.gather(*heavy)
        batcher.close()
        return light

    assert asyncio.run(main()) == ["l0"]
    assert all(len({x[0] for x in batch}) == 1 for batch in calls)  # one domain per batch
    light_at = next(i for i, batch in enumerate(calls) if batch == ["l0"])
    assert light_at <= 2, f"the light request waited behind {light_at} heavy batches"
    assert len(calls) == 21


def test_a_full_queue_refuses_the_domain_over_its_share_not_the_others():
    async def main() -> None:
        gate = threading.Event()
        batcher = MicroBatcher(lambda items: (gate.wait(5), items)[1], max_batch_texts=4, max_queue_texts=16)
        first = asyncio.create_task(batcher.submit(["busy"], key="heavy"))  # holds the model
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(batcher.submit(["h"] * 4, key="heavy")) for _ in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="heavy"):
            await batcher.submit(["h"] * 4, key="heavy")
        light = asyncio.create_task(batcher.submit(["l"] * 4, key="light"))  # its share is free
        await asyncio.sleep(0)
        gate.set()
        assert await light == ["l"] * 4
        await asyncio.gather(first, *queued)
        batcher.close()

    asyncio.run(main())


# --- domains over one resident base -------------------------------------------------------------


def _as_domain(src: Path, out: Path, domain: str, dev: float | None = None) -> Path:
    """A copy of a trained model directory recorded under another domain name (and dev score)."""
    shutil.copytree(src, out)
    meta = json.loads((out / "l3m.json").read_text())
    meta["domain"] = domain
    if dev is not None:
        meta["metrics"]["dev"][meta.get("metric") or "macro_f1"] = dev
    (out / "l3m.json").write_text(json.dumps(meta))
    return out


def _register(home: Path, model_dir: Path) -> str:
    from serving import registry

    with env(BENTOML_HOME=str(home)):
        res = registry.register(model_dir)
        if not res.promoted:  # a 1-epoch toy model need not beat the baseline: force it (not what is tested)
            res = registry.promote(res.tag, force=True)
    assert res.promoted
    return res.tag


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_mlm_dir) -> dict[str, Path]:
    """A weight_mask domain and a lora domain (names ``wm_a``, ``lora_b``) over the same base."""
    root = tmp_path_factory.mktemp("multi")
    return {"wm_a": _as_domain(train_compact(root / "wm", tiny_mlm_dir, "weight_mask"), root / "wm_a", "wm_a"),
            "lora_b": _as_domain(train_compact(root / "lo", tiny_mlm_dir, "lora"), root / "lora_b", "lora_b")}


@pytest.fixture()
def home(tmp_path, trained) -> Path:
    for d in trained.values():
        _register(tmp_path, d)
    return tmp_path


def _domain_set(home: Path, wanted: list[str] | None) -> DomainSet:
    from serving import registry

    with env(BENTOML_HOME=str(home)):
        ds = DomainSet(wanted, registry.model_path, registry.model_path)
        ds.refresh()
    return ds


def _classify(served: Served, texts: list[str]) -> list[dict[str, object]]:
    rows = encode_inputs(served.tokenizer, served.meta.max_length, None, texts, None)
    return predict_encoded(served.model, served.tokenizer, served.meta, rows)


def test_each_domain_serves_its_offline_predictions_over_one_resident_base(home, trained):
    ds = _domain_set(home, None)
    assert ds.names() == ["lora_b", "wm_a"]
    for name, model_dir in trained.items():
        got, want = _classify(ds.get(name), TEXTS), offline_predictions(model_dir, TEXTS)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want, strict=True):
            for label, p in w["probabilities"].items():
                assert g["probabilities"][label] == pytest.approx(p, abs=1e-6)
    wm, lo = (ds.get(n).model for n in ("wm_a", "lora_b"))
    emb = "bert.embeddings.word_embeddings.weight"
    assert wm.get_parameter(emb).data_ptr() == lo.get_parameter(emb).data_ptr()  # one copy of the base
    query = "bert.encoder.layer.0.attention.self.query"
    assert wm.get_submodule(query).weight.data_ptr() == lo.get_submodule(query).base_layer.weight.data_ptr()
    for name in ("wm_a", "lora_b"):  # each domain owns far less than the base it runs over
        assert ds.get(name).owned_bytes < ds.pool.bytes() / 4


def test_domains_with_the_same_tokenizer_files_share_an_encoder_key(home, tmp_path):
    """The service loads one set of tokenizer lanes per encoder key, not per domain."""
    import dataclasses

    from serving.domains import encoder_key

    ds = _domain_set(home, None)
    wm, lo = ds.get("wm_a"), ds.get("lora_b")
    assert wm.path != lo.path and encoder_key(wm, 1000) == encoder_key(lo, 1000)
    assert encoder_key(wm, 1000) != encoder_key(wm, 2000)  # another text bound
    longer = dataclasses.replace(wm, meta=dataclasses.replace(wm.meta, max_length=wm.meta.max_length + 1))
    assert encoder_key(longer, 1000) != encoder_key(wm, 1000)
    other = tmp_path / "tok"
    shutil.copytree(wm.path, other)
    vocab = next(other.glob("vocab*.txt"), None) or next(other.glob("tokenizer.json"))
    vocab.write_text(vocab.read_text() + "\n")  # other tokenizer contents
    assert encoder_key(dataclasses.replace(wm, path=other), 1000) != encoder_key(wm, 1000)


def test_unknown_or_missing_domain_names_the_served_ones(home):
    ds = _domain_set(home, None)
    with pytest.raises(UnknownDomain, match=r"'nope' is not served; served: \['lora_b', 'wm_a'\]"):
        ds.get("nope")
    with pytest.raises(UnknownDomain, match="name one in 'domain'"):
        ds.get(None)
    single = _domain_set(home, ["wm_a"])
    assert single.get(None).meta.domain == "wm_a"  # one domain served: no name needed


def test_refresh_reloads_nothing_when_the_ledger_did_not_change(home):
    ds = _domain_set(home, None)
    before = ds.served
    with env(BENTOML_HOME=str(home)):
        assert ds.refresh() == []
    assert ds.served is before


def test_promotion_rollback_and_a_new_domain_reach_a_running_set_under_load(home, trained, tmp_path, caplog):
    from serving import registry

    ds = _domain_set(home, None)
    old = ds.get("lora_b").tag
    results: list[tuple[str, list[dict[str, object]]]] = []
    failures: list[BaseException] = []

    def run(items: list[tuple[Served, str]]) -> list[tuple[str, dict[str, object]]]:
        served = items[0][0]
        return [(served.tag, p) for p in _classify(served, [t for _, t in items])]

    async def load(stop: threading.Event) -> None:
        batcher = MicroBatcher(run, max_batch_texts=8, max_queue_texts=10_000)

        async def client(domain: str) -> None:
            while not stop.is_set():
                try:
                    out = await batcher.submit([(ds.get(domain), t) for t in TEXTS], key=domain)
                    results.append((domain, out))
                except BaseException as e:  # noqa: BLE001 - every failure is counted
                    failures.append(e)
                await asyncio.sleep(0)

        await asyncio.gather(*(client(d) for d in ("lora_b", "wm_a") * 4))
        batcher.close()

    stop = threading.Event()
    loader = threading.Thread(target=lambda: asyncio.run(load(stop)))
    caplog.set_level(logging.INFO, logger="l3m.serving")
    loader.start()
    try:
        new = _register(home, _as_domain(trained["lora_b"], tmp_path / "v2", "lora_b", dev=0.99))
        with env(BENTOML_HOME=str(home)):
            swaps = ds.refresh()
            assert swaps == [f"domain lora_b: {old} -> {new}"]
            n_before = len(results)
            time.sleep(0.3)
            assert any(out[0][0] == new for _, out in results[n_before:])  # the new version answers
            registry.rollback("lora_b")
            assert ds.refresh() == [f"domain lora_b: {new} -> {old}"]
        added = _register(home, _as_domain(trained["wm_a"], tmp_path / "c", "wm_c"))
        with env(BENTOML_HOME=str(home)):
            assert ds.refresh() == [f"domain wm_c: (new) -> {added}"]
        time.sleep(0.2)
    finally:
        stop.set()
        loader.join()
    assert failures == []
    assert len(results) > 10
    assert ds.names() == ["lora_b", "wm_a", "wm_c"]
    assert sum("swap domain" in r.getMessage() for r in caplog.records) == 3
