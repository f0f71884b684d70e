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


def test_bfloat16_serving_is_close_to_float32_and_bad_dtypes_are_named(pair_model, monkeypatch):
    model, tok, meta = pair_model
    texts, pairs = ["a short premise", "another premise here"], ["hypothesis", "a hypothesis"]
    fp32 = predict(model, tok, meta, texts, pairs)
    bf16 = predict(model, tok, meta, texts, pairs, dtype="bfloat16")
    for a, b in zip(fp32, bf16, strict=True):
        assert set(b["probabilities"]) == set(a["probabilities"])
        assert sum(b["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        # bf16 matmuls: close to, not equal to, float32 (a tiny random model's probabilities)
        assert b["probabilities"] == pytest.approx(a["probabilities"], abs=0.05)
        assert b["probabilities"] != a["probabilities"]
    with pytest.raises(ValueError, match="unknown serving dtype 'fp8'"):
        predict(model, tok, meta, texts, pairs, dtype="fp8")
    from serving.schemas import Settings

    monkeypatch.setenv("L3M_DTYPE", "half")
    with pytest.raises(ValueError, match="L3M_DTYPE='half' is not one of"):
        Settings.from_env()
    monkeypatch.setenv("L3M_DTYPE", "bfloat16")
    assert Settings.from_env().dtype == "bfloat16"
