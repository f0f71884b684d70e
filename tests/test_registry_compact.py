"""Registering weight_mask and lora models: the domain file + a reference to one shared base.

The base is stored once per content (reused by every domain over it, stored again when its files
differ), the merged weights are left out, and loading from the store rebuilds exactly what the
run directory holds. Full models are stored as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest_serving import build_tiny_model_dir
from safetensors import safe_open
from safetensors.torch import save_file
from test_compact_serving import train_compact
from test_serving import env

from l3m import basefiles
from serving import registry
from serving.bases import BASE_NAME, BASE_REF, read_ref
from serving.model_io import ModelDirError, load_classifier, predict

TEXTS = ["good great fine item x", "awful poor bad item y", "lovely dreadful item z"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mlm_dir) -> dict[str, Path]:
    return {kind: train_compact(tmp_path_factory.mktemp(f"reg-{kind}"), tiny_mlm_dir, kind)
            for kind in ("weight_mask", "lora")}


def set_base_digest(domain_file: Path, digest: str | None) -> None:
    """Rewrite the base digest a domain file records (None: none, as before it was recorded)."""
    with safe_open(str(domain_file), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["l3m"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
    meta.pop("base_digest", None)
    save_file(tensors, str(domain_file), metadata={"l3m": json.dumps(meta | ({"base_digest": digest} if digest else {}))})


def _bases() -> list[str]:
    return sorted(str(m.tag) for m in registry._store().list() if m.tag.name == BASE_NAME)


def _probs(path: Path) -> list[dict]:
    model, tok, meta = load_classifier(path)
    return [p["probabilities"] for p in predict(model, tok, meta, TEXTS)]


def test_compact_domains_share_one_stored_base_and_load_exactly(runs, tmp_path):
    with env(BENTOML_HOME=str(tmp_path)):
        tags = {kind: registry.register(d).tag for kind, d in runs.items()}
        bases = _bases()
        assert len(bases) == 1  # stored once, shared by both domains
        assert [m["tag"] for m in registry.list_models()] == [tags["lora"], tags["weight_mask"]]  # not a domain
        for kind, tag in tags.items():
            stored = registry.model_path(tag)
            ref = read_ref(stored)
            assert ref is not None and ref.tag == bases[0] and "model.safetensors" in ref.files
            assert not list(stored.glob("model*.safetensors"))  # no merged copy (weight_mask's run has one)
            assert (stored / f"{kind}.safetensors").is_file()
            assert _probs(stored) == _probs(runs[kind])  # rebuilt over the stored base: the same numbers
    assert list(runs["weight_mask"].glob("model.safetensors"))


def test_a_base_with_other_content_is_stored_again(runs, tiny_mlm_dir, tmp_path):
    other = shutil.copytree(tiny_mlm_dir, tmp_path / "other-base")
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(cfg | {"l3m_test": "another file content"}))
    moved = shutil.copytree(runs["lora"], tmp_path / "lora-over-other")
    meta = json.loads((moved / "l3m.json").read_text())
    meta["config"]["model"]["name_or_path"] = meta["base_model"] = str(other)
    (moved / "l3m.json").write_text(json.dumps(meta))
    set_base_digest(moved / "lora.safetensors", basefiles.base_digest(other))  # as if trained over it
    with env(BENTOML_HOME=str(tmp_path / "home")):
        first = registry.register(runs["lora"]).tag
        again = registry.register(runs["lora"]).tag  # a second version over the same base
        second = registry.register(moved).tag
        assert len(_bases()) == 2
        refs = [read_ref(registry.model_path(t)) for t in (first, again, second)]
        assert refs[0] == refs[1] and refs[0] != refs[2]
        assert _probs(registry.model_path(second)) == _probs(runs["lora"])


def test_a_base_changed_in_the_store_is_refused(runs, tmp_path):
    with env(BENTOML_HOME=str(tmp_path)):
        stored = registry.model_path(registry.register(runs["weight_mask"]).tag)
        ref = read_ref(stored)
        assert ref is not None
        base = registry.model_path(ref.tag)
        (base / "tokenizer_config.json").chmod(0o644)
        with open(base / "tokenizer_config.json", "a") as fh:
            fh.write(" ")
        with pytest.raises(ModelDirError, match="has changed in the store"):
            load_classifier(stored)
        (base / "config.json").unlink()
        with pytest.raises(ModelDirError, match=r"lacks \['config.json'\]"):
            load_classifier(stored)
        (stored / BASE_REF).write_text("{}")
        with pytest.raises(ModelDirError, match="not a base reference"):
            load_classifier(stored)


def test_full_models_are_stored_with_their_weights_and_no_base(tmp_path):
    src = build_tiny_model_dir(tmp_path / "full")
    with env(BENTOML_HOME=str(tmp_path / "home")):
        stored = registry.model_path(registry.register(src).tag)
        assert (stored / "model.safetensors").is_file() and not (stored / BASE_REF).exists()
        assert _bases() == []


def test_a_full_model_whose_tuner_spec_no_longer_validates_still_registers(tmp_path):
    """Where a model's weights are is decided by its tuner's kind, not by its spec validating."""
    src = build_tiny_model_dir(tmp_path / "full")
    meta = json.loads((src / "l3m.json").read_text())
    meta["tuner"] = {"kind": "full", "a_field_of_an_older_version": 1}
    (src / "l3m.json").write_text(json.dumps(meta))
    with env(BENTOML_HOME=str(tmp_path / "home")):
        stored = registry.model_path(registry.register(src).tag)
        assert (stored / "model.safetensors").is_file() and _bases() == []


def test_a_compact_model_without_its_domain_file_is_refused(runs, tmp_path):
    src = tmp_path / "no-domain-file"  # the merged copy is there, the masks are not: nothing to store
    shutil.copytree(runs["weight_mask"], src)
    (src / "weight_mask.safetensors").unlink()
    with env(BENTOML_HOME=str(tmp_path / "home")), pytest.raises(ModelDirError, match="weight_mask.safetensors"):
        registry.register(src)


def test_an_out_of_range_confidence_is_refused_before_any_scoring(tmp_path):
    src = build_tiny_model_dir(tmp_path / "full")
    with env(BENTOML_HOME=str(tmp_path / "home")), pytest.raises(registry.RegistryError, match="confidence 1.5"):
        registry.register(src, confidence=1.5)
