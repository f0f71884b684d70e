"""Request validation types and batched prediction (pair domains, chunking, truncation flags)."""

from __future__ import annotations

import pytest
from conftest_serving import build_tiny_model_dir, write_meta
from pydantic import TypeAdapter, ValidationError

from serving.model_io import _length_chunks, load_classifier, predict
from serving.schemas import TextPair, split_items, texts_type


def test_single_text_domain_accepts_a_text_or_a_list():
    ta = TypeAdapter(texts_type(False, 3))
    assert ta.validate_python("hello") == ["hello"]
    assert ta.validate_python(["a", "b"]) == ["a", "b"]
    for bad in ([], ["a"] * 4, [""], ["  "], [3], [None], [["a", "b"]], 7, None):
        with pytest.raises(ValidationError):
            ta.validate_python(bad)


def test_pair_domain_takes_objects_or_two_lists_and_rejects_plain_texts():
    ta = TypeAdapter(texts_type(True, 4))
    items = ta.validate_python([{"text": "a", "text_pair": "b"}, ["c", "d"]])
    assert split_items(items) == (["a", "c"], ["b", "d"])
    assert split_items(ta.validate_python({"text": "x", "text_pair": "y"})) == (["x"], ["y"])
    for bad in (["plain"], [{"text": "a"}], [{"text": "a", "text_pair": " "}], [["a", "b", "c"]],
                [{"text": "a", "text_pair": "b", "extra": 1}]):
        with pytest.raises(ValidationError):
            ta.validate_python(bad)
    assert isinstance(items[0], TextPair)


def test_length_chunks_cover_every_row_once_within_budget():
    lengths = [5, 120, 7, 64, 64, 3, 128, 20]
    chunks = _length_chunks(lengths, 256)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 256
    assert _length_chunks([], 256) == []


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory):
    out = build_tiny_model_dir(tmp_path_factory.mktemp("pair"))
    write_meta(out, dev=0.5, text_pair=True)
    return load_classifier(out)


def test_batched_prediction_equals_one_by_one_for_pairs_with_truncation(pair_model):
    model, tok, meta = pair_model
    texts = ["a short premise", "word " * 200, "another premise here", "x"]
    pairs = ["hypothesis", "short", "yet another hypothesis " * 3, "y " * 100]
    batched = predict(model, tok, meta, texts, pairs, chunk_tokens=64)
    single = [predict(model, tok, meta, [t], [p])[0] for t, p in zip(texts, pairs, strict=True)]
    assert [b["truncated"] for b in batched] == [False, True, False, True]
    for b, s in zip(batched, single, strict=True):
        assert b["label"] == s["label"] and b["truncated"] == s["truncated"]
        assert b["probabilities"] == pytest.approx(s["probabilities"], abs=1e-5)
    # The project-wide encoding: exactly what the tokenizer gives with truncation at max_length.
    enc = tok(texts[1], pairs[1], truncation=True, max_length=meta.max_length)
    assert len(enc["input_ids"]) == meta.max_length
