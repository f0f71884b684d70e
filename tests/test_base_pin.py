"""A compact domain is pinned to the base it was trained on.

Its domain file records the base's content digest (``l3m.basefiles``, the digest the registry
stores the base under); registering over a base whose files changed since is refused (before
anything is stored), an unchanged base registers and loads the trained numbers, and a domain
file written before the digest was recorded registers as before. The run's ``model.revision``
reaches the base's load when a compact run directory is rebuilt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_compact_serving import train_compact
from test_registry_compact import TEXTS, set_base_digest
from test_serving import env

from l3m import basefiles
from l3m.tuning.compact import read_meta
from serving import registry
from serving.bases import BASE_NAME, read_ref
from serving.model_io import ModelDirError, load_classifier, predict

MASKS = "weight_mask.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_mlm_dir) -> tuple[Path, Path]:
    """(a weight_mask run's model dir, the base it was trained on: a copy only this module uses)."""
    root = tmp_path_factory.mktemp("pin")
    base = shutil.copytree(tiny_mlm_dir, root / "base")
    return train_compact(root, base, "weight_mask"), base


def over_own_base(trained: tuple[Path, Path], dest: Path) -> tuple[Path, Path]:
    """A copy of the run whose l3m.json names its own copy of the base (same files, so the same
    digest): the base can then be changed without touching other tests."""
    run, base = trained
    new_base = shutil.copytree(base, dest / "base")
    moved = shutil.copytree(run, dest / "run")
    meta = json.loads((moved / "l3m.json").read_text())
    meta["config"]["model"]["name_or_path"] = meta["base_model"] = str(new_base)
    (moved / "l3m.json").write_text(json.dumps(meta))
    return moved, new_base


def change_weights(base: Path) -> None:
    """What a re-download of another version or an edit does: other weights under the same path."""
    tensors = load_file(str(base / "model.safetensors"))
    name = next(k for k in sorted(tensors) if k.endswith("attention.self.query.weight"))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})


def stored_tags() -> list[str]:
    return sorted(str(m.tag) for m in registry._store().list())


def probs(path: Path) -> list[dict]:
    model, tok, meta = load_classifier(path)
    return [p["probabilities"] for p in predict(model, tok, meta, TEXTS)]


def test_the_domain_file_records_the_digest_of_its_base(trained, tmp_path):
    run, base = trained
    recorded = read_meta(run / MASKS).get("base_digest")
    assert recorded == basefiles.base_digest(base) and len(recorded) == 64
    with env(BENTOML_HOME=str(tmp_path)):  # the digest the registry stores the base under
        ref = read_ref(registry.model_path(registry.register(run).tag))
    assert ref is not None and ref.digest == recorded


def test_a_base_changed_on_disk_since_training_is_refused(trained, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    run, base = over_own_base(trained, tmp_path)
    trained_on = read_meta(run / MASKS)["base_digest"]
    change_weights(base)
    now = basefiles.base_digest(base)
    assert now != trained_on
    with env(BENTOML_HOME=str(tmp_path / "home")):
        with pytest.raises(ModelDirError) as refused:
            registry.register(run)
        for part in (trained_on, now, str(base), "retrain"):
            assert part in str(refused.value)
        cli = CliRunner().invoke(app, ["models", "register", str(run)])
        assert cli.exit_code == 2 and "has changed since this weight_mask model was trained" in cli.output
        assert registry.list_models() == [] and stored_tags() == []  # neither the domain nor the base


def test_an_unchanged_base_registers_and_loads_the_trained_numbers(trained, tmp_path):
    run, _ = over_own_base(trained, tmp_path)
    assert read_meta(run / MASKS).get("base_digest")
    with env(BENTOML_HOME=str(tmp_path / "home")):
        stored = registry.model_path(registry.register(run).tag)
        assert [t for t in stored_tags() if t.startswith(BASE_NAME)]
        assert probs(stored) == probs(trained[0])


def test_a_domain_file_without_a_recorded_digest_registers_as_before(trained, tmp_path):
    run, base = over_own_base(trained, tmp_path)
    assert read_meta(run / MASKS).get("base_digest")  # the refusal below comes from it
    change_weights(base)
    set_base_digest(run / MASKS, None)  # as written before the digest was recorded
    assert "base_digest" not in read_meta(run / MASKS)
    with env(BENTOML_HOME=str(tmp_path / "home")):
        tag = registry.register(run).tag
        assert [m["tag"] for m in registry.list_models()] == [tag]


def test_the_run_revision_reaches_the_base_load(trained, tmp_path, monkeypatch):
    """A compact run directory rebuilt over a hub base loads it at the run's ``model.revision``;
    the registry looks up the same revision's snapshot."""
    import huggingface_hub

    import l3m.tuning.compact as compact
    from l3m.tuning.trained import load_trained
    from serving.bases import local_base
    from serving.model_io import read_meta as read_run_meta

    run, base = trained
    hub = shutil.copytree(run, tmp_path / "hub-run", ignore=shutil.ignore_patterns("model*.safetensors"))
    meta = json.loads((hub / "l3m.json").read_text())
    meta["config"]["model"].update(name_or_path="some-org/some-mlm", revision="0123abc")
    meta.update(base_model="some-org/some-mlm", base_revision="0123abc")
    (hub / "l3m.json").write_text(json.dumps(meta))

    asked: list[tuple[str, str | None]] = []

    class Loaded(Exception):
        pass

    class FakeAuto:
        @staticmethod
        def from_pretrained(name, **kwargs):
            asked.append((str(name), kwargs.get("revision")))
            raise Loaded

    monkeypatch.setattr(compact, "AutoModelForSequenceClassification", FakeAuto)
    with pytest.raises(Loaded):
        load_trained(hub)
    assert asked == [("some-org/some-mlm", "0123abc")]

    snapshots: list[tuple[str, str | None]] = []

    def snapshot_download(repo_id, revision=None, local_files_only=False, **_):
        snapshots.append((repo_id, revision))
        return str(base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert local_base(read_run_meta(hub)) == base
    assert snapshots == [("some-org/some-mlm", "0123abc")]
