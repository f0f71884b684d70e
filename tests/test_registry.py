"""Registry: metadata/labels in the BentoML store, promotion rule, rollback, safety checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest_serving import (
    build_tiny_model_dir,
    copy_with_dev,
    offline_predictions,
    one_torch_thread,
    trained_model_dir,
)

from serving import registry
from serving.model_io import ModelDirError, load_classifier, predict

DOMAIN = "citation_intent"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(h))
    return h


@pytest.fixture()
def versions(tiny_dir, tmp_path):
    """Factory: a copy of a small model dir recording a given dev score."""
    counter = iter(range(100))

    def make(dev: float, **kw) -> Path:
        return copy_with_dev(tiny_dir, tmp_path / f"v{next(counter)}", dev, **kw)

    return make


def test_register_stores_metadata_labels_and_safetensors(home, versions):
    res = registry.register(versions(0.5))
    assert res.promoted and res.stage == "production" and res.previous_production is None
    assert res.tag.startswith("l3m-citation_intent:")
    info = registry.show(res.tag)
    assert info["labels"] == {"domain": DOMAIN, "strategy": "l3", "tuner": "full", "stage": "production"}
    md = info["metadata"]
    for key in ("base_model", "strategy", "tuner", "config", "data_fingerprint", "score_key", "code_version"):
        assert key in md, key
    assert md["metrics"]["dev"]["macro_f1"] == 0.5 and md["metrics"]["test"]["macro_f1"] == 0.49
    assert md["label_names"][0] == "Background" and "base_revision" not in md  # None is dropped
    assert md["strategy"]["rate"] == 0.15 and md["strategy_kind"] == "l3" and md["seed"] == 1
    assert md["metrics"]["dev"]["per_class"]["Uses"]["support"] == 10
    assert info["strategy"] == "l3" and info["tuner"] == "full" and info["dev"] == 0.5
    stored = Path(info["path"])
    assert (stored / "model.safetensors").is_file() and (stored / "l3m.json").is_file()
    assert not list(stored.glob("*.bin"))
    assert registry.production_tag(DOMAIN) == res.tag
    assert [e["action"] for e in info["events"]] == ["register+promote"]


def test_worse_model_stays_candidate_with_reason(home, versions):
    first = registry.register(versions(0.5))
    worse = registry.register(versions(0.4))
    assert not worse.promoted and worse.stage == "candidate"
    assert "below the bar" in worse.reason and first.tag in worse.reason
    assert registry.production_tag(DOMAIN) == first.tag
    assert registry.show(worse.tag)["stage"] == "candidate"
    assert "below the bar" in registry.show(worse.tag)["reason"]


def test_margin_is_applied_and_equal_score_promotes(home, versions):
    first = registry.register(versions(0.5))
    slightly = registry.register(versions(0.52), promote_margin=0.05)
    assert not slightly.promoted and registry.production_tag(DOMAIN) == first.tag
    equal = registry.register(versions(0.5))  # "at least the current production's"
    assert equal.promoted and equal.previous_production == first.tag
    assert registry.show(first.tag)["stage"] == "archived"


def test_manual_promote_refuses_worse_unless_forced(home, versions):
    best = registry.register(versions(0.6))
    worse = registry.register(versions(0.3))
    refused = registry.promote(worse.tag)
    assert not refused.promoted and "below the bar" in refused.reason
    assert registry.production_tag(DOMAIN) == best.tag
    forced = registry.promote(worse.tag, force=True)
    assert forced.promoted and forced.reason.startswith("forced:") and forced.previous_production == best.tag
    assert registry.production_tag(DOMAIN) == worse.tag
    again = registry.promote(worse.tag)
    assert not again.promoted and again.reason == "already production"


def test_rollback_restores_previous_production(home, versions):
    a = registry.register(versions(0.5))
    b = registry.register(versions(0.6))
    c = registry.register(versions(0.7))
    assert registry.production_tag(DOMAIN) == c.tag
    back = registry.rollback(DOMAIN)
    assert back.tag == b.tag and back.previous_production == c.tag
    assert registry.production_tag(DOMAIN) == b.tag
    assert registry.show(c.tag)["stage"] == "candidate"
    assert registry.rollback(DOMAIN).tag == a.tag
    with pytest.raises(registry.RegistryError, match="no earlier production"):
        registry.rollback(DOMAIN)
    assert registry.production_tag(DOMAIN) == a.tag


def test_rollback_without_production_is_an_error(home):
    with pytest.raises(registry.RegistryError, match="no production model"):
        registry.rollback("nothing_here")


def test_list_models_filters_by_domain_newest_first(home, versions):
    a = registry.register(versions(0.5))
    b = registry.register(versions(0.4))
    other = registry.register(versions(0.9, domain="other_domain"))
    rows = registry.list_models(DOMAIN)
    assert [r["tag"] for r in rows] == [b.tag, a.tag]
    assert {r["stage"] for r in rows} == {"production", "candidate"}
    assert rows[0]["dev"] == 0.4 and rows[0]["metric"] == "macro_f1"
    assert {r["tag"] for r in registry.list_models()} == {a.tag, b.tag, other.tag}
    # Domains are independent: the other domain's first model is its production.
    assert registry.production_tag("other_domain") == other.tag


def test_ledger_is_plain_json_without_leftovers(home, versions):
    registry.register(versions(0.5))
    registry.register(versions(0.4))
    data = json.loads((home / "l3m-registry.json").read_text())
    assert set(data) >= {"models", "domains", "events"} and len(data["models"]) == 2
    assert not list(home.glob(".l3m-registry-*"))  # no temp files from the atomic write


def test_refuses_pickle_weights_and_bad_dirs(home, versions, tmp_path):
    pickled = versions(0.5)
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelDirError, match="safetensors only"):
        registry.register(pickled)
    assert issubclass(ModelDirError, registry.RegistryError)  # the CLI catches RegistryError
    no_meta = versions(0.5)
    (no_meta / "l3m.json").unlink()
    with pytest.raises(ModelDirError, match="no l3m.json"):
        registry.register(no_meta)
    no_dev = versions(0.5)
    meta = json.loads((no_dev / "l3m.json").read_text())
    meta["metrics"] = {"test": {"macro_f1": 0.5}}
    (no_dev / "l3m.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="metrics.dev.macro_f1"):
        registry.register(no_dev)
    assert registry.list_models() == []  # nothing half-registered
    assert registry.production_tag(DOMAIN) is None


def test_unknown_tag_is_a_registry_error(home):
    with pytest.raises(registry.RegistryError):
        registry.show("l3m-citation_intent:doesnotexist")


def test_stored_copy_predicts_like_the_source_directory(home, tmp_path_factory):
    model_dir = trained_model_dir(tmp_path_factory.getbasetemp())
    res = registry.register(model_dir)
    model, tok, meta = load_classifier(registry.show(res.tag)["path"])
    texts = ["We follow the setup of Smith et al. ( 2010 ) .", "Future work could extend ( Lee , 2001 ) ."]
    with one_torch_thread():
        served = predict(model, tok, meta, texts)
    offline = offline_predictions(model_dir, texts)
    assert [p["label"] for p in served] == [o["label"] for o in offline]
    for p, o in zip(served, offline, strict=True):
        assert p["probabilities"] == pytest.approx(o["probabilities"], abs=1e-5)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
