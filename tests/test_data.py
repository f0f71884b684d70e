"""Loading and Great Expectations validation: shipped domains and deliberately broken files."""

from __future__ import annotations

from pathlib import Path

import pytest

from l3m.config import DomainConfig, load_config
from l3m.data.loading import DataError, load_domain, read_raw
from l3m.data.report import to_markdown, write_report
from l3m.data.validation import DataValidationError, validate_domain
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _validate(cfg_dict: dict):
    cfg = DomainConfig.model_validate(cfg_dict)
    return validate_domain(cfg, read_raw(cfg))


# ------------------------------------------------------------------ loading


def test_toy_domain_loads_with_stable_label_mapping(toy_domain):
    d = load_domain(DomainConfig.model_validate(toy_domain()))
    assert d.label_names == ["neg", "neu", "pos"]
    assert set(d.dataset) == {"train", "dev", "test"}
    row = d.dataset["train"][0]
    assert d.label_names[row["label"]] == row["label_name"]
    assert d.fingerprint == load_domain(DomainConfig.model_validate(toy_domain())).fingerprint


def test_missing_splits_are_carved_stratified_and_seeded(toy_domain):
    cfg = DomainConfig.model_validate(toy_domain(splits={"train": {"path": "toy/train.jsonl"}}))
    a, b = load_domain(cfg), load_domain(cfg)
    assert a.dataset["test"]["text"] == b.dataset["test"]["text"]
    assert {s: a.dataset[s].num_rows for s in ("train", "dev", "test")} == {"train": 48, "dev": 6, "test": 6}
    # stratified: every class present in the carved test split, two of each
    assert sorted(a.dataset["test"]["label"]) == [0, 0, 1, 1, 2, 2]
    assert any("test: missing, carved" in n for n in a.notes)


def test_numeric_labels_sort_numerically_and_csv_with_other_field_names(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"sentence": [f"s {i}" for i in range(40)], "other": [f"o {i}" for i in range(40)],
                       "y": [2, 10, 1] * 13 + [2]})
    df.to_csv(tmp_path / "train.csv", index=False)
    cfg = DomainConfig(name="csvpair", data_root=str(tmp_path), splits={"train": {"path": "train.csv"}},
                       text_field="sentence", text_pair_field="other", label_field="y")
    d = load_domain(cfg)
    assert d.label_names == ["1", "2", "10"]
    assert d.has_pair and d.dataset["train"][0]["text_pair"].startswith("o ")


# ------------------------------------------------------------------ broken files


def test_file_that_does_not_exist(toy_domain):
    cfg = DomainConfig.model_validate(toy_domain(splits={"train": {"path": "toy/nope.jsonl"}}))
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_domain(cfg)


def test_empty_file(toy_domain):
    (toy_domain.root / "toy" / "train.jsonl").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        load_domain(DomainConfig.model_validate(toy_domain()))


def test_non_json_line_is_named(toy_domain):
    p = toy_domain.root / "toy" / "train.jsonl"
    lines = p.read_text().splitlines()
    lines[6] = '{"text": "broken", "label": '
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl: line 7: not valid JSON"):
        load_domain(DomainConfig.model_validate(toy_domain()))


def test_wrong_field_names_list_the_fields_present(toy_domain):
    with pytest.raises(DataError, match=r"field\(s\) \['sentence'\] not found; the file has fields \['label', 'text'\]"):
        load_domain(DomainConfig.model_validate(toy_domain(text_field="sentence")))


def test_null_and_empty_texts_fail_validation_with_rows(toy_domain):
    p = toy_domain.root / "toy" / "train.jsonl"
    rows = [*[{"text": f"ok {i}", "label": "pos"} for i in range(20)],
            {"text": None, "label": "pos"}, {"text": "   ", "label": "neg"}, {"text": 12, "label": "neg"}]
    write_jsonl(p, rows)
    rep = _validate(toy_domain())
    failed = {(r.split, r.check) for r in rep.errors}
    assert {("train", "text_not_null"), ("train", "text_not_blank"), ("train", "text_is_string")} <= failed
    blank = next(r for r in rep.errors if r.check == "text_not_blank")
    assert blank.examples[0]["line"] == 22  # 1-based file line (no blank lines in this file)
    with pytest.raises(DataError, match="empty or non-string text"):
        load_domain(DomainConfig.model_validate(toy_domain()))
    # Opting into the repair drops them, and the cleaned data passes.
    rep2 = _validate(toy_domain(cleaning={"drop_empty": True}))
    assert not any(r.check.startswith("text_not") for r in rep2.errors)


def test_unknown_labels_in_eval_split(toy_domain):
    write_jsonl(toy_domain.root / "toy" / "test.jsonl",
                [{"text": f"t {i}", "label": "pos"} for i in range(12)] + [{"text": "x", "label": "mystery"}])
    rep = _validate(toy_domain())
    err = next(r for r in rep.errors if r.check == "label_in_label_set")
    assert err.split == "test" and err.examples[0]["value"] == "mystery"
    with pytest.raises(DataValidationError, match=r"\[test\] label_in_label_set"):
        raise DataValidationError(rep)
    with pytest.raises(DataError, match="labels outside"):
        load_domain(DomainConfig.model_validate(toy_domain()))


def test_severity_override_turns_an_error_into_a_warning(toy_domain):
    write_jsonl(toy_domain.root / "toy" / "dev.jsonl", [{"text": "train 0 x", "label": "pos"}] * 0
                + [{"text": t, "label": "pos"} for t in _train_texts(toy_domain)[:12]])
    assert any(r.check == "train_test_leakage" for r in _validate(toy_domain()).errors)
    rep = _validate(toy_domain(validation={"severity": {"train_test_leakage": "warning"}}))
    assert rep.passed and any(r.check == "train_test_leakage" for r in rep.warnings)


def _train_texts(make) -> list[str]:
    import json

    return [json.loads(x)["text"] for x in (make.root / "toy" / "train.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the shipped domains


@pytest.fixture(scope="module")
def shipped_reports(shared_data):
    reps = {}
    for p in sorted((ROOT / "domains").glob("*.yaml")):
        cfg = load_config(p)
        reps[cfg.domain.name] = validate_domain(cfg.domain, read_raw(cfg.domain))
    return reps


def _raw_failed(rep, check: str, split: str | None = None) -> bool:
    return any(r.check == check and not r.success and (split is None or r.split == split) for r in rep.raw)


def test_every_shipped_domain_validates_and_passes_after_its_cleaning(shipped_reports):
    assert set(shipped_reports) == {"chemprot", "citation_intent", "hyperpartisan", "imdb", "ohsumed"}
    for name, rep in shipped_reports.items():
        assert rep.passed, (name, [(r.split, r.check) for r in rep.errors])


def test_reports_name_the_real_problems(shipped_reports):
    chem = shipped_reports["chemprot"]
    cov = next(r for r in chem.final if r.check == "label_coverage" and r.split == "test")
    assert "SUBSTRATE_PRODUCT-OF" in cov.detail  # a train label that test lacks
    assert any(r.check == "class_min_examples" and "AGONIST-INHIBITOR" in r.detail for r in chem.warnings)
    hyper = shipped_reports["hyperpartisan"]
    assert _raw_failed(hyper, "html_markup", "train") and _raw_failed(hyper, "text_not_blank", "dev")
    assert any("unescaped HTML" in n for n in hyper.cleaning_notes)
    cit = shipped_reports["citation_intent"]
    leak = next(r for r in cit.raw if r.check == "train_test_leakage" and r.split == "test")
    assert leak.unexpected_count == 52
    assert _raw_failed(cit, "duplicates", "train") and _raw_failed(cit, "conflicting_labels", "train")
    md = to_markdown(cit)
    assert "train_test_leakage" in md and "dropped 83 rows whose text also appears in dev/test" in md


def test_report_files(shipped_reports, tmp_path):
    import json

    paths = write_report(shipped_reports["hyperpartisan"], tmp_path)
    summary = json.loads(paths["json"].read_text())
    assert summary["passed"] is True and summary["domain"] == "hyperpartisan"
    assert "<table>" in paths["html"].read_text()
