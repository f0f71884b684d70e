"""The Prefect `register` flow, the dev snapshot reader and the pipeline's registration cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest_serving import build_tiny_model_dir, copy_with_dev, label_names

from serving.model_io import RegistryError


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def write_snapshot(out: Path, fingerprint: str = "snap-1", **manifest_over: object) -> Path:
    """A validated data snapshot as the lead's validation step writes it: dev.parquet + manifest.json."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    gold = ["Background"] * 6 + ["Uses"] * 3 + ["Future"]
    pd.DataFrame({"text": [f"we cite ( Smith , {2000 + i} ) here" for i in range(len(gold))],
                  "label_name": gold}).to_parquet(out / "dev.parquet")
    manifest = {"fingerprint": fingerprint, "label_names": label_names(), "majority_label": "Background",
                "text_pair": False} | manifest_over
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


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

    text = asyncio.run(latest_artifact())
    assert within_margin["tag"] in text and "majority-class baseline" in text and "dev data fingerprint" in text


def test_snapshot_reader_and_its_errors(tmp_path):
    from flows.register import eval_set_from_snapshot

    dev = eval_set_from_snapshot(write_snapshot(tmp_path / "ok"))
    assert dev.fingerprint == "snap-1" and dev.majority_label == "Background" and dev.pairs is None
    assert len(dev.texts) == len(dev.gold) == 10 and dev.gold[-1] == "Future"
    with pytest.raises(RegistryError, match=r"manifest.json: lacks \['majority_label'\]"):
        bad = write_snapshot(tmp_path / "bad")
        (bad / "manifest.json").write_text(json.dumps({"fingerprint": "x", "label_names": [], "text_pair": False}))
        eval_set_from_snapshot(bad)
    with pytest.raises(RegistryError, match=r"dev.parquet: lacks column\(s\) \['text_pair'\]"):
        eval_set_from_snapshot(write_snapshot(tmp_path / "pairs", text_pair=True))
    with pytest.raises(RegistryError, match="manifest.json: missing"):
        eval_set_from_snapshot(tmp_path / "nowhere")


# ---------------------------------------------------------------- registration cache ---------


def _params(model_dir: Path, snapshot: Path | None, margin: float = 0.0, confidence: float = 0.95) -> dict:
    return {"model_dir": str(model_dir), "promote_margin": margin, "snapshot_dir": str(snapshot) if snapshot else None,
            "confidence": confidence}


def test_cache_key_changes_with_every_input(tmp_path, tiny_dir, monkeypatch):
    import flows.register as fr

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home-a"))
    model = copy_with_dev(tiny_dir, tmp_path / "m", 0.5)
    snap = write_snapshot(tmp_path / "snap")
    key = fr.register_cache_key(None, _params(model, snap))
    assert fr.register_cache_key(None, _params(model, snap)) == key  # deterministic: reusable
    changed = {"margin": fr.register_cache_key(None, _params(model, snap, margin=0.01)),
               "confidence": fr.register_cache_key(None, _params(model, snap, confidence=0.9)),
               "no snapshot": fr.register_cache_key(None, _params(model, None))}
    write_snapshot(snap, fingerprint="snap-2")
    changed["snapshot fingerprint"] = fr.register_cache_key(None, _params(model, snap))
    write_snapshot(snap)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home-b"))
    changed["store"] = fr.register_cache_key(None, _params(model, snap))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home-a"))
    code = tmp_path / "code.py"
    code.write_text("v = 1\n")
    monkeypatch.setattr(fr, "REGISTER_CODE", (*fr.REGISTER_CODE, str(code)))
    before_code_change = fr.register_cache_key(None, _params(model, snap))
    code.write_text("v = 2\n")
    changed["code"] = fr.register_cache_key(None, _params(model, snap))
    assert changed["code"] != before_code_change
    write_snapshot(snap)
    copy_with_dev(tiny_dir, tmp_path / "m2", 0.51)
    changed["l3m.json"] = fr.register_cache_key(None, _params(tmp_path / "m2", snap))
    assert all(v != key for v in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_rerun_reuses_registration_and_reregisters_a_deleted_tag(prefect_harness, tmp_path, tiny_dir, monkeypatch):
    import bentoml
    from prefect import flow

    from flows.register import register_once
    from serving import registry

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    model = copy_with_dev(tiny_dir, tmp_path / "m", 0.5)
    snap = write_snapshot(tmp_path / "snap")

    @flow
    def reg(snapshot: str | None) -> dict:
        return register_once(str(model), 0.0, snapshot)

    first = reg(str(snap))
    assert first["evaluated_on"] == "dev snapshot" and first["data_fingerprint"] == "snap-1"
    assert reg(str(snap)) == first  # nothing changed: cached, no second version
    assert len(registry.list_models()) == 1

    write_snapshot(snap, fingerprint="snap-2")  # new dev data: registered (and scored) again
    second = reg(str(snap))
    assert second["tag"] != first["tag"] and second["data_fingerprint"] == "snap-2"
    assert len(registry.list_models()) == 2

    bentoml.models.delete(second["tag"], _model_store=registry._store())
    third = reg(str(snap))  # the cached tag is gone from the store: registered again
    assert third["tag"] not in (first["tag"], second["tag"]) and registry.has_model(third["tag"])
    assert reg(str(snap)) == third


def test_cached_results_are_json_not_pickle(prefect_harness, tmp_path, tiny_dir, monkeypatch):
    import os

    from prefect import flow

    from flows.register import register_cache_key, register_once

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    model = copy_with_dev(tiny_dir, tmp_path / "m", 0.5)

    @flow
    def reg() -> dict:
        return register_once(str(model), 0.0, None)

    res = reg()
    key = register_cache_key(None, _params(model, None))
    stored = Path(os.environ["PREFECT_HOME"]).glob(f"**/{key}")
    record = json.loads(next(iter(stored)).read_text())
    assert record["metadata"]["serializer"]["type"] == "json"
    assert json.loads(record["result"])["tag"] == res["tag"]


def test_rerun_with_nothing_changed_adds_no_version_and_no_bento(prefect_harness, tmp_path, tiny_dir, monkeypatch):
    from prefect import flow

    from flows.register import bento_tag, build_bento_task, register_once
    from serving import registry

    home = tmp_path / "bentoml"
    for k, v in {"BENTOML_HOME": str(home), "PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    model = copy_with_dev(tiny_dir, tmp_path / "m", 0.5)

    @flow
    def register_and_package() -> tuple[dict, dict]:
        registered = register_once(str(model), 0.0, None)  # the pipeline's two lines
        return registered, build_bento_task(registered)

    registered, bento = register_and_package()
    assert registered["stage"] == "production" and bento == {"tag": bento_tag(registered["tag"]), "status": "built"}
    again, bento_again = register_and_package()
    assert again == registered and bento_again["status"] == "exists (nothing changed)"
    assert len(registry.list_models()) == 1
    assert [p.parent.parent.name for p in (home / "bentos").glob("*/*/bento.yaml")] == ["l3m-citation_intent"]


def test_cli_register_with_a_bad_snapshot_exits_2_naming_the_file(tmp_path, tiny_dir, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    snap = write_snapshot(tmp_path / "snap")
    (snap / "dev.parquet").unlink()
    res = CliRunner().invoke(app, ["models", "register", str(tiny_dir), "--snapshot", str(snap)])
    assert res.exit_code == 2 and "dev.parquet: missing" in res.output and "Traceback" not in res.output
    ok = CliRunner().invoke(app, ["models", "register", str(tiny_dir), "--snapshot", str(write_snapshot(snap))])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout[ok.stdout.index("{"):])  # stdout: transformers' progress bars go to stderr
    assert out["evaluated_on"] == "dev snapshot" and out["data_fingerprint"] == "snap-1"


# ---------------------------------------------------------------- the stage now (issue #23) ---


def test_rerun_after_promote_and_rollback_reports_the_true_stage(prefect_harness, tmp_path, tiny_dir, monkeypatch):
    from prefect import flow

    import flows.register as fr
    from serving import registry

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    packaged: list[str] = []
    monkeypatch.setattr(fr, "build_bento", lambda tag: (packaged.append(tag), (f"bento-of-{tag}", True))[1])
    model = copy_with_dev(tiny_dir, tmp_path / "a", 0.5)

    @flow
    def rerun() -> tuple[dict, dict]:
        registered = fr.register_once(str(model), 0.0, None)  # the pipeline's two lines
        return registered, fr.build_bento_task(registered)

    first, _ = rerun()
    assert first["stage"] == "production" and packaged == [first["tag"]]
    # Someone promotes a better version by hand: the unchanged rerun's model is archived now.
    newer = registry.register(copy_with_dev(tiny_dir, tmp_path / "b", 0.6))
    assert newer.promoted
    again, bento = rerun()
    assert again["tag"] == first["tag"] and again["stage"] == "archived"
    assert again["stage_at_registration"] == "production" and "archived now" in again["reason"]
    assert bento["tag"] is None and packaged == [first["tag"]]  # newer is not packaged in its place
    registry.rollback("citation_intent")
    back, bento = rerun()
    assert back["stage"] == "production" and bento["tag"] == f"bento-of-{first['tag']}"
    assert packaged == [first["tag"]] * 2 and len(registry.list_models()) == 2  # no version added


def test_bento_tag_covers_serving_code_bentofile_and_pins(tmp_path, monkeypatch):
    import shutil

    import flows.register as fr

    root = tmp_path / "repo"
    shutil.copytree(fr.ROOT / "serving", root / "serving")
    monkeypatch.setattr(fr, "ROOT", root)
    monkeypatch.setattr(fr, "BENTOFILE", root / "serving" / "bentofile.yaml")
    model = "l3m-citation_intent:abc123"
    tag = fr.bento_tag(model)
    assert tag.startswith(model + "-") and fr.bento_tag(model) == tag  # unchanged: the same bento
    changed = {}
    service = root / "serving" / "service.py"
    service.write_text(service.read_text() + "\n# changed\n")
    changed["serving code"] = fr.bento_tag(model)
    bentofile = root / "serving" / "bentofile.yaml"
    text = bentofile.read_text()
    bentofile.write_text(text.replace("torch==2.13.0", "torch==2.13.1"))
    changed["pins"] = fr.bento_tag(model)
    bentofile.write_text(text.replace("TOKENIZERS_PARALLELISM", "TOKENIZERS_PARALLELISM_X"))
    changed["bentofile"] = fr.bento_tag(model)
    (root / "serving" / "unrelated.txt").write_text("not packaged")  # not in the bentofile's include
    changed["unrelated"] = fr.bento_tag(model)
    assert changed.pop("unrelated") == changed["bentofile"]
    assert len({tag, *changed.values()}) == 4, changed
