"""Offline prediction records (written by training) and their comparison with served ones."""

from __future__ import annotations

import numpy as np
import pytest

from l3m.evaluate import prediction_records, read_predictions, write_predictions
from serving.verify import compare, predictions_path

LABELS = ["a", "b", "c"]


def records() -> list[dict]:
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.5]])
    return prediction_records(logits, [0, 1, 1], LABELS, ["x", "y", "z"], ["p", None, "r"])


def test_records_hold_input_gold_label_and_probabilities(tmp_path):
    recs = records()
    assert [r["label"] for r in recs] == ["a", "c", "b"] and [r["gold"] for r in recs] == ["a", "b", "b"]
    assert recs[0]["text_pair"] == "p" and recs[0]["text"] == "x"
    assert sum(recs[1]["probabilities"].values()) == pytest.approx(1.0)
    assert recs[1]["probabilities"]["c"] == pytest.approx(np.exp(3) / (np.exp(3) + 2))
    write_predictions(tmp_path / "predictions" / "test.jsonl", recs)
    assert read_predictions(predictions_path(tmp_path, "test")) == recs


def test_records_refuse_misaligned_inputs():
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        prediction_records(np.zeros((2, 3)), [0, 1, 2], LABELS, ["x", "y", "z"])


def test_compare_reports_mismatches_and_accuracy():
    offline = records()
    served = [dict(r, probabilities=dict(r["probabilities"])) for r in offline]
    same = compare("test", offline, served)
    assert same.ok and same.max_prob_diff == 0.0 and same.served_accuracy == same.offline_accuracy == 2 / 3
    served[2] = dict(served[2], label="c", probabilities={"a": 0.1, "b": 0.2, "c": 0.7})
    diff = compare("test", offline, served)
    assert not diff.ok and diff.label_mismatches == [2]
    assert diff.max_prob_diff == pytest.approx(0.7 - offline[2]["probabilities"]["c"])
    assert diff.served_accuracy == 1 / 3 and diff.to_dict()["label_agreement"] == pytest.approx(2 / 3)


def test_missing_predictions_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="exported without offline predictions"):
        predictions_path(tmp_path, "test")
