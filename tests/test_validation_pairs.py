"""Validation on pair data, carved splits, the unlabelled corpus, file line numbers and the dev/test policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l3m.config import DomainConfig, ValidationSpec, load_config
from l3m.data.loading import DataError, load_domain, load_unlabelled, prepare, read_raw
from l3m.data.report import to_markdown
from l3m.data.validation import DataValidationError, validate_domain
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _one(rep, check: str, split: str, final: bool = True):
    return next(r for r in (rep.final if final else rep.raw) if r.check == check and r.split == split)


# ------------------------------------------------------------------ pair domains


def _nli(tmp_path: Path, **over: object) -> DomainConfig:
    labels = ["entailment", "neutral", "contradiction"]
    # Twelve premises, each with three hypotheses of three labels: premises repeat with
    # different hypotheses, which is neither a duplicate nor a conflict.
    train = [{"premise": f"premise number {p}", "hypothesis": f"hypothesis {p}-{h}", "gold": labels[h]}
             for p in range(12) for h in range(3)]
    train.append({"premise": "premise number 0", "hypothesis": "hypothesis 0-0", "gold": "neutral"})  # conflict
    train.append({"premise": "premise number 5", "hypothesis": "hypothesis 5-1", "gold": "neutral"})  # duplicate
    dev = [{"premise": f"premise number {p}", "hypothesis": f"dev hypothesis {p}", "gold": labels[p % 3]}
           for p in range(12)]
    dev.append({"premise": "premise number 7", "hypothesis": "hypothesis 7-2", "gold": "contradiction"})  # leaked
    write_jsonl(tmp_path / "nli" / "train.jsonl", train)
    write_jsonl(tmp_path / "nli" / "dev.jsonl", dev)
    write_jsonl(tmp_path / "nli" / "test.jsonl", dev[:12])
    return DomainConfig.model_validate({
        "name": "nli", "data_root": str(tmp_path), "text_field": "premise", "text_pair_field": "hypothesis",
        "label_field": "gold", "splits": {s: {"path": f"nli/{s}.jsonl"} for s in ("train", "dev", "test")}, **over})


def test_pair_domain_checks_compare_pairs_and_show_both_texts(tmp_path):
    cfg = _nli(tmp_path, cleaning={"dedupe": True, "drop_leaked_from_train": True})
    raw = read_raw(cfg)
    rep = validate_domain(cfg, raw)
    conflict = _one(rep, "conflicting_labels", "train", final=False)
    assert not conflict.success and conflict.unexpected_count == 1 and "1 pairs" in conflict.detail
    assert {e["line"] for e in conflict.examples} == {1, 37}
    assert all(e["text_pair"] == "hypothesis 0-0" for e in conflict.examples)
    dup = _one(rep, "duplicates", "train", final=False)  # the conflicting pair (2 rows) + the repeated one (2)
    assert dup.unexpected_count == 4 and {e["line"] for e in dup.examples} == {1, 17, 37, 38}
    leak = _one(rep, "train_test_leakage", "dev", final=False)
    assert leak.unexpected_count == 1
    assert leak.examples[0]["line"] == 13 and leak.examples[0]["train_line"] == 24
    assert _one(rep, "train_test_leakage", "test", final=False).success  # premises shared, pairs not
    md = to_markdown(rep)
    assert "'premise number 7' + 'hypothesis 7-2'" in md and "line 13 of dev.jsonl" in md
    # Cleaning removes by pair too: 2 conflicting + 1 duplicate + 1 leaked train row, dev untouched.
    prepared = prepare(cfg, raw)
    assert len(prepared.frames["train"]) == len(raw.frames["train"]) - 4
    assert len(prepared.frames["dev"]) == 13 and prepared.split_status["dev"] == "standard"
    assert rep.passed and _one(rep, "conflicting_labels", "train").success


# ------------------------------------------------------------------ dev/test stay standard


def _non_blank_lines(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for ln in fh if ln.strip())


@pytest.mark.parametrize("domain", sorted(p.stem for p in (ROOT / "domains").glob("*.yaml")))
def test_shipped_domains_keep_their_dev_and_test_rows(domain, shared_data):
    cfg = load_config(ROOT / "domains" / f"{domain}.yaml").domain
    raw = read_raw(cfg)
    prepared = prepare(cfg, raw)
    for split in ("dev", "test"):
        if split in cfg.splits:
            assert len(prepared.frames[split]) == _non_blank_lines(raw.sources[split]), (domain, split)
            assert prepared.frames[split].equals(raw.frames[split]), (domain, split)
            assert prepared.split_status[split] == "standard"
        else:
            assert prepared.split_status[split] == "carved" and len(prepared.frames[split]) > 0


def test_shipped_domain_comments_do_not_promise_cleaned_eval_splits():
    for p in (ROOT / "domains").glob("*.yaml"):
        assert "eval_splits" not in p.read_text(), p  # none opts in: every shipped dev/test is standard


# ------------------------------------------------------------------ carving


def test_carved_dev_is_validated_and_the_carve_is_deterministic(toy_domain):
    train = [json.loads(x) for x in (toy_domain.root / "toy" / "train.jsonl").read_text().splitlines()]
    write_jsonl(toy_domain.root / "toy" / "train.jsonl", train + train)  # every text twice, no dedupe
    cfg = DomainConfig.model_validate(toy_domain(splits={"train": {"path": "toy/train.jsonl"}}))
    raw = read_raw(cfg)
    a, b = prepare(cfg, raw), prepare(cfg, read_raw(cfg))
    for split in ("train", "dev", "test"):
        assert a.frames[split].equals(b.frames[split])
    # Carved rows keep their train line: the text on that line is the row's.
    lines = (toy_domain.root / "toy" / "train.jsonl").read_text().splitlines()
    for line, text in zip(a.frames["dev"]["line"], a.frames["dev"]["text"], strict=True):
        assert json.loads(lines[line - 1])["text"] == text
    rep = validate_domain(cfg, raw, a)
    leak = _one(rep, "train_test_leakage", "dev")
    assert not leak.success and leak in rep.errors and "of train.jsonl" in leak.examples[0]["where"]
    assert rep.split_status == {"dev": "carved", "test": "carved"}
    assert "carved from" in rep.sources["dev"]


def test_carving_a_cleaned_train_drops_the_train_copies_of_carved_rows(toy_domain):
    train = [json.loads(x) for x in (toy_domain.root / "toy" / "train.jsonl").read_text().splitlines()]
    write_jsonl(toy_domain.root / "toy" / "train.jsonl", train + train)
    cfg = DomainConfig.model_validate(toy_domain(splits={"train": {"path": "toy/train.jsonl"}},
                                                 cleaning={"drop_leaked_from_train": True}))
    rep = validate_domain(cfg, read_raw(cfg))
    assert rep.passed and _one(rep, "train_test_leakage", "dev").success


# ------------------------------------------------------------------ the unlabelled corpus


def _corpus(toy_domain, text: str, **over: object) -> DomainConfig:
    (toy_domain.root / "toy" / "corpus.txt").write_text(text, encoding="utf-8")
    return DomainConfig.model_validate(toy_domain(unlabelled={"path": "toy/corpus.txt"}, **over))


def test_corpus_blank_and_duplicate_lines_are_reported_by_line(toy_domain):
    cfg = _corpus(toy_domain, "first text\n\nsame text\n   \nsecond text\nsame text\nlast\n")
    rep = validate_domain(cfg, read_raw(cfg))
    blank = _one(rep, "corpus_blank_lines", "unlabelled", final=False)
    assert [e["line"] for e in blank.examples] == [2, 4] and blank.severity == "warning"
    dup = _one(rep, "corpus_duplicates", "unlabelled", final=False)
    assert [e["line"] for e in dup.examples] == [3, 6] and "line 6 of corpus.txt" in to_markdown(rep)
    # As used, blank lines are skipped; the repeated line is still there (a warning) and keeps its line.
    assert _one(rep, "corpus_blank_lines", "unlabelled").success
    assert [e["line"] for e in _one(rep, "corpus_duplicates", "unlabelled").examples] == [3, 6]
    assert rep.passed and rep.row_counts["unlabelled"] == {"raw": 7, "used": 5}
    assert load_unlabelled(cfg) == ["first text", "same text", "second text", "same text", "last"]


def test_corpus_dedupe_and_severity_are_configurable(toy_domain):
    text = "first text\nsame text\nsame text\n"
    cfg = _corpus(toy_domain, text, cleaning={"dedupe_unlabelled": True})
    assert load_unlabelled(cfg) == ["first text", "same text"]
    assert _one(validate_domain(cfg, read_raw(cfg)), "corpus_duplicates", "unlabelled").success
    strict = _corpus(toy_domain, text, validation={"severity": {"corpus_duplicates": "error"}})
    rep = validate_domain(strict, read_raw(strict))
    assert not rep.passed and [r.check for r in rep.errors] == ["corpus_duplicates"]


def test_corpus_decode_error_names_file_and_line(toy_domain):
    cfg = _corpus(toy_domain, "")
    (toy_domain.root / "toy" / "corpus.txt").write_bytes(b"ok\nfine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"corpus\.txt: line 3: not valid UTF-8"):
        read_raw(cfg)


# ------------------------------------------------------------------ line numbers


def test_jsonl_with_blank_lines_reports_the_physical_line(toy_domain):
    p = toy_domain.root / "toy" / "train.jsonl"
    lines = p.read_text().splitlines()
    lines[10] = json.dumps({"text": "   ", "label": "pos"})
    p.write_text("\n\n" + "\n".join(lines[:5]) + "\n\n   \n" + "\n".join(lines[5:]) + "\n")
    rep = validate_domain(DomainConfig.model_validate(toy_domain()), read_raw(DomainConfig.model_validate(toy_domain())))
    blank = _one(rep, "text_not_blank", "train")
    # Row 10 of the file's records, after 2 leading blank lines and 2 more after record 5: line 15.
    assert blank.examples[0]["line"] == 15 and blank.examples[0]["where"] == "line 15 of train.jsonl"
    assert p.read_text().splitlines()[14].startswith('{"text": "   "')
    assert "line 15 of train.jsonl" in str(DataValidationError(rep))


def test_csv_lines_count_the_header_and_multiline_fields(tmp_path):
    rows = "".join(f"s {i},{['a', 'b'][i % 2]}\n" for i in range(20))
    (tmp_path / "train.csv").write_text('sentence,y\n"two\nlines",a\n\n' + rows + ",b\n")
    cfg = DomainConfig(name="csv", data_root=str(tmp_path), splits={"train": {"path": "train.csv"}},
                       text_field="sentence", label_field="y")
    raw = read_raw(cfg)
    assert raw.frames["train"]["line"].tolist()[:3] == [2, 5, 6] and raw.line_kind["train"] == "line"
    null = _one(validate_domain(cfg, raw), "text_not_null", "train", final=False)
    assert null.examples[0]["line"] == 25


# ------------------------------------------------------------------ imbalance, degenerate cleaning, opt-in


def test_imbalance_ratio_is_shown_when_the_check_passes_and_the_threshold_is_documented(toy_domain):
    write_jsonl(toy_domain.root / "toy" / "train.jsonl",
                [{"text": f"good {i}", "label": "pos"} for i in range(42)]
                + [{"text": f"bad {i}", "label": "neg"} for i in range(2)]
                + [{"text": f"meh {i}", "label": "neu"} for i in range(10)])
    rep = validate_domain(DomainConfig.model_validate(toy_domain()), read_raw(DomainConfig.model_validate(toy_domain())))
    imb = _one(rep, "class_imbalance", "train")
    assert imb.success and "ratio 21.0" in imb.detail and "threshold 50" in imb.detail
    assert "Class balance (train, as used): ratio 21.0" in to_markdown(rep)
    assert "max_imbalance_ratio`` (50)" in (ValidationSpec.__doc__ or "")
    assert "max_imbalance_ratio" in (ROOT / "docs" / "validation.md").read_text()


def test_cleaning_that_empties_train_is_a_clear_error_not_a_crash(toy_domain):
    # Every train text identical, labels differing: dedupe drops them all as conflicting.
    write_jsonl(toy_domain.root / "toy" / "train.jsonl",
                [{"text": "same", "label": ["pos", "neg", "neu"][i % 3]} for i in range(30)])
    for splits in (None, {"train": {"path": "toy/train.jsonl"}}):  # with shipped and with carved dev/test
        over = {"cleaning": {"dedupe": True}, **({"splits": splits} if splits else {})}
        cfg = DomainConfig.model_validate(toy_domain(**over))
        rep = validate_domain(cfg, read_raw(cfg))
        deg = _one(rep, "cleaning_degenerate", "train")
        assert deg in rep.errors and "cleaning step dedupe left train with 0 rows and 0 class(es)" in deg.detail
        with pytest.raises(DataValidationError, match=r"\[train\] cleaning_degenerate"):
            raise DataValidationError(rep)


def test_cleaning_that_leaves_one_class_names_the_step(toy_domain):
    rows = [{"text": "same", "label": "pos"}] * 20 + [{"text": f"bad {i}", "label": "neg"} for i in range(3)]
    write_jsonl(toy_domain.root / "toy" / "train.jsonl", rows)
    cfg = DomainConfig.model_validate(toy_domain(cleaning={"dedupe": True, "drop_leaked_from_train": True}))
    write_jsonl(toy_domain.root / "toy" / "dev.jsonl", rows[20:] + [{"text": f"d {i}", "label": "pos"} for i in range(12)])
    rep = validate_domain(cfg, read_raw(cfg))
    deg = _one(rep, "cleaning_degenerate", "train")
    assert not deg.success and "step drop_leaked_from_train left train with 1 rows and 1 class(es)" in deg.detail


def test_dev_test_cleaning_only_when_opted_in_and_then_reported_non_standard(toy_domain):
    dev = [json.loads(x) for x in (toy_domain.root / "toy" / "dev.jsonl").read_text().splitlines()]
    write_jsonl(toy_domain.root / "toy" / "dev.jsonl", dev + dev[:2])
    default = DomainConfig.model_validate(toy_domain(cleaning={"dedupe": True}))
    rep = validate_domain(default, read_raw(default))
    assert rep.row_counts["dev"] == {"raw": 17, "used": 17} and rep.split_status["dev"] == "standard"
    assert _one(rep, "duplicates", "dev") in rep.warnings
    assert "not the standard split" not in to_markdown(rep)
    opted = DomainConfig.model_validate(toy_domain(cleaning={"dedupe": True, "eval_splits": True}))
    rep = validate_domain(opted, read_raw(opted))
    assert rep.row_counts["dev"] == {"raw": 17, "used": 15} and rep.split_status == {"dev": "cleaned",
                                                                                     "test": "standard"}
    assert "**cleaned: not the standard split**" in to_markdown(rep)
    assert load_domain(opted).dataset["dev"].num_rows == 15
