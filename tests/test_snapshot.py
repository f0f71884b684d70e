"""The validated data snapshot: written once, reused while nothing it depends on changed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from l3m.config import RunConfig
from l3m.data import snapshot
from l3m.data.loading import load_domain, prepare, read_raw


def _cfg(toy_domain, tmp_path: Path, **over: object) -> RunConfig:
    return RunConfig.model_validate({"domain": toy_domain(**over), "output_dir": str(tmp_path / "out")})


def _write(cfg: RunConfig) -> Path:
    raw = read_raw(cfg.domain)
    return snapshot.write_snapshot(snapshot.snapshot_dir(cfg), cfg.domain, prepare(cfg.domain, raw), {"passed": True})


def test_snapshot_round_trips_the_prepared_data(toy_domain, tmp_path):
    cfg = _cfg(toy_domain, tmp_path)
    path = _write(cfg)
    loaded = snapshot.load_snapshot(path)
    direct = load_domain(cfg.domain)
    assert loaded.fingerprint == direct.fingerprint and loaded.label_names == direct.label_names
    for split in ("train", "dev", "test"):
        assert loaded.dataset[split]["text"] == direct.dataset[split]["text"]
        assert loaded.dataset[split]["label"] == direct.dataset[split]["label"]
    manifest = snapshot.read_manifest(path)
    assert manifest["rows"] == {"train": 60, "dev": 15, "test": 15}
    assert manifest["majority_label"] in direct.label_names and manifest["text_pair"] is False
    assert not list(path.parent.glob(".*"))  # no temporary directory left behind


def test_snapshot_is_found_again_when_nothing_changed(toy_domain, tmp_path):
    cfg = _cfg(toy_domain, tmp_path)
    assert snapshot.find_snapshot(cfg) is None
    path = _write(cfg)
    assert snapshot.find_snapshot(_cfg(toy_domain, tmp_path)) == path


@pytest.mark.parametrize("change", ["split bytes", "corpus bytes", "cleaning", "carve seed", "data code"])
def test_snapshot_is_not_reused_when_an_input_changed(toy_domain, tmp_path, monkeypatch, change):
    corpus = Path(toy_domain.root) / "toy" / "corpus.txt"
    corpus.write_text("one in-domain line\nanother line\n", encoding="utf-8")
    over = {"unlabelled": {"path": "toy/corpus.txt"}}
    cfg = _cfg(toy_domain, tmp_path, **over)
    before = snapshot.snapshot_dir(cfg)
    if change == "split bytes":
        with (Path(toy_domain.root) / "toy" / "train.jsonl").open("a") as fh:
            fh.write(json.dumps({"text": "a new row", "label": "pos"}) + "\n")
    elif change == "corpus bytes":
        corpus.write_text("one in-domain line\nanother line\na third\n", encoding="utf-8")
    elif change == "cleaning":
        cfg = _cfg(toy_domain, tmp_path, **over, cleaning={"dedupe": True})
    elif change == "carve seed":
        cfg = _cfg(toy_domain, tmp_path, **over, split_spec={"seed": 7})
    else:
        monkeypatch.setattr(snapshot, "code_digest", lambda: "another version of the data code")
    assert snapshot.snapshot_dir(cfg) != before


def test_snapshot_carries_the_prepared_corpus(toy_domain, tmp_path):
    corpus = Path(toy_domain.root) / "toy" / "corpus.txt"
    corpus.write_text("line one\n\nline two\n", encoding="utf-8")
    cfg = _cfg(toy_domain, tmp_path, unlabelled={"path": "toy/corpus.txt"})
    loaded = snapshot.load_snapshot(_write(cfg))
    assert loaded.unlabelled == ["line one", "line two"]
    assert pd.read_parquet(snapshot.snapshot_dir(cfg) / "unlabelled.parquet")["text"].tolist() == ["line one", "line two"]


def test_reading_something_that_is_not_a_snapshot_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a data snapshot"):
        snapshot.load_snapshot(tmp_path)


def test_the_validate_step_records_row_counts_and_checks_in_the_manifest(toy_domain, tmp_path):
    from flows.validate import validate_and_report

    cfg = _cfg(toy_domain, tmp_path)
    report, paths = validate_and_report(cfg)
    manifest = snapshot.read_manifest(paths["snapshot"])
    v = manifest["validation"]
    assert v["passed"] and v["row_counts"]["dev"] == {"raw": 15, "used": 15}
    assert {c["check"] for c in v["checks"]} >= {"row_count", "train_test_leakage", "conflicting_labels"}
    assert v["split_status"] == {"dev": "standard", "test": "standard"}
