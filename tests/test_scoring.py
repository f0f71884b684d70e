"""PLL engine: parity with minicons, metric plans, packed vs library forward, long texts, fast modes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from l3m.scoring import PLLScorer, make_plan, onednn
from l3m.scoring.plans import encode

FIXTURE = Path(__file__).parent / "fixtures" / "minicons_citation_intent.json"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shared_model: Path) -> Path:
    """A 2-layer random BERT with the real tokenizer: same code paths, negligible compute."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(shared_model)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=512)  # fmt: skip
    BertForMaskedLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    """Tiny-model tests are many small ops: one thread avoids OpenMP spin-waits on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real_scorer(shared_model: Path) -> PLLScorer:
    return PLLScorer(str(shared_model), dtype="float32", device="cpu")


@pytest.mark.parametrize("metric", ["original", "within_word_l2r"])
def test_parity_with_minicons(real_scorer: PLLScorer, metric: str):
    ref = json.loads(FIXTURE.read_text())
    ours = real_scorer.score(ref["texts"], metric=metric, max_length=512)
    for text_scores, expected, tokens in zip(
        ours, ref["results"][metric]["scores"], ref["results"][metric]["tokens"], strict=True
    ):
        assert np.isnan(text_scores[0]) and np.isnan(text_scores[-1])  # [CLS], [SEP]
        got = text_scores[1:-1]
        assert got.shape[0] == len(expected) == len(tokens)
        assert np.abs(got - np.asarray(expected)).max() <= 1e-4


def test_within_word_l2r_masks_the_rest_of_the_word(real_scorer: PLLScorer):
    tok = real_scorer.tokenizer
    enc = encode(tok, [("optimization by MERT towards post-edits", None)], 64)[0]
    pieces = tok.convert_ids_to_tokens(enc.input_ids.tolist())
    plan = make_plan(enc, "within_word_l2r")
    rows = {int(t[0]): np.flatnonzero(m).tolist() for m, t in zip(plan.mask, plan.targets, strict=True)}
    mer = pieces.index("mer")
    assert pieces[mer + 1] == "##t"
    assert rows[mer] == [mer, mer + 1]  # first subword: its right neighbour in the word is masked too
    assert rows[mer + 1] == [mer + 1]  # last subword: only itself
    assert rows[1] == [1]  # single-token word
    original = make_plan(enc, "original")
    assert (original.mask.sum(1) == 1).all() and original.n_copies == enc.n_targets


def test_scores_align_with_training_encoding_and_pairs(real_scorer: PLLScorer):
    tok = real_scorer.tokenizer
    items = [("A rather long first text " * 8, "and its pair"), ("short one", None), ("x y", "")]
    scores = real_scorer.score(items, metric="within_word_l2r", max_length=24)
    for (text, pair), s in zip(items, scores, strict=True):
        enc = tok(text, pair, truncation=True, max_length=24, return_special_tokens_mask=True)
        assert s.dtype == np.float32 and s.shape[0] == len(enc["input_ids"])
        special = np.asarray(enc["special_tokens_mask"], dtype=bool)
        assert np.isnan(s[special]).all() and np.isfinite(s[~special]).all()
        assert (s[~special] <= 0).all()


@pytest.mark.parametrize("metric", ["original", "within_word_l2r"])
@pytest.mark.parametrize("mode", ["exact", "strided"])
@pytest.mark.parametrize("row_chunk", [2048, 40])  # 40: groups cut into several chunks, chunks of several groups
def test_packed_forward_equals_library_forward(tiny_model_dir: Path, one_thread, metric: str, mode: str,
                                               row_chunk: int, monkeypatch):
    import l3m.scoring.packed

    monkeypatch.setattr(l3m.scoring.packed, "ROW_CHUNK", row_chunk)
    items = [("the first text has several words in it", "with a pair"), ("another, shorter text", None),
             ("unbelievably tokenized subwords everywhere", None)] * 2  # fmt: skip
    packed = PLLScorer(str(tiny_model_dir), dtype="float32", device="cpu")
    library = PLLScorer(str(tiny_model_dir), dtype="float32", device="cpu", packed=False)
    assert packed.packed is not None and library.packed is None
    kw = {"metric": metric, "mode": mode, "stride": 3, "max_length": 64, "token_budget": 256}
    a, b = packed.score(items, **kw), library.score(items, **kw)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, equal_nan=True)


def test_long_text_is_split_across_batches(tiny_model_dir: Path, one_thread):
    scorer = PLLScorer(str(tiny_model_dir), dtype="float32", device="cpu")
    text = " ".join(f"word{i}" for i in range(600))
    budget = 4096
    s = scorer.score([text], metric="original", max_length=512, token_budget=budget)[0]
    assert s.shape[0] == 512 and np.isfinite(s[1:-1]).all()
    # 510 copies x 512 tokens = 261k tokens, yet no batch exceeded the budget: memory is
    # bounded by the budget, not by the text.
    assert scorer.stats.copies == 510 and scorer.stats.max_batch_tokens <= budget
    assert scorer.stats.forward_batches >= 510 * 512 // budget


def test_copies_split_over_batches_score_as_one_batch(tiny_model_dir: Path, one_thread):
    scorer = PLLScorer(str(tiny_model_dir), dtype="float32", device="cpu")
    items = [" ".join(f"tok{i}" for i in range(60)), "a short text", "another short text here"]
    split = scorer.score(items, metric="within_word_l2r", max_length=128, token_budget=300)
    whole = scorer.score(items, metric="within_word_l2r", max_length=128, token_budget=10**6)
    for x, y in zip(split, whole, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, equal_nan=True)


def test_strided_tracks_exact(real_scorer: PLLScorer):
    texts = json.loads(FIXTURE.read_text())["texts"]
    exact = np.concatenate(real_scorer.score(texts, metric="within_word_l2r"))
    fin = np.isfinite(exact)
    strided = np.concatenate(real_scorer.score(texts, metric="within_word_l2r", mode="strided", stride=4))
    assert np.array_equal(np.isfinite(strided), fin)  # every target is scored once
    assert spearmanr(exact[fin], strided[fin])[0] >= 0.95


@pytest.mark.skipif(not onednn.supports(torch.bfloat16),
                    reason=f"no oneDNN bfloat16 kernel on this CPU (needs {onednn.LOW_PRECISION_CPU_NEEDS})")
def test_bf16_tracks_exact(real_scorer: PLLScorer, shared_model: Path):
    texts = json.loads(FIXTURE.read_text())["texts"]
    exact = np.concatenate(real_scorer.score(texts, metric="within_word_l2r"))
    fin = np.isfinite(exact)
    bf16 = PLLScorer(str(shared_model), dtype="bfloat16", device="cpu")
    assert bf16.compute_dtype == torch.bfloat16
    fast = np.concatenate(bf16.score(texts, metric="within_word_l2r"))
    assert spearmanr(exact[fin], fast[fin])[0] >= 0.99
    assert np.abs(exact[fin] - fast[fin]).max() < 0.25


def test_low_precision_without_a_cpu_kernel_falls_back_to_float32_with_a_reason(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(onednn, "supports", lambda dtype: dtype == torch.float32)
    with caplog.at_level(logging.WARNING, logger="l3m.scoring"):
        scorer = PLLScorer(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert scorer.compute_dtype == torch.float32
    assert "bfloat16 requested, but this CPU has no oneDNN bfloat16 kernel" in caplog.text
    fp32 = PLLScorer(str(tiny_model_dir), dtype="float32", device="cpu")
    items = ["a short text", "another short text here"]
    for a, b in zip(scorer.score(items), fp32.score(items), strict=True):
        np.testing.assert_array_equal(a, b)
    from serving.model_io import serving_dtype

    assert serving_dtype("bfloat16", "cpu") == "float32" and serving_dtype("float32", "cpu") == "float32"


def test_onednn_probe_agrees_with_the_kernel():
    """The probe says yes exactly when a bf16 oneDNN GEMM runs (the fast path the engine takes)."""
    x = torch.randn(8, 32).bfloat16()
    w = torch.randn(16, 32).bfloat16()
    try:
        torch.ops.mkldnn._linear_pointwise(x, w, torch.zeros(16).bfloat16(), "none", [], "none")
        ran = True
    except RuntimeError:
        ran = False
    assert onednn.supports(torch.bfloat16) is ran


def test_strided_plan_covers_each_target_once(real_scorer: PLLScorer):
    enc = encode(real_scorer.tokenizer, [("post-edits under the TER target metric .", None)], 64)[0]
    plan = make_plan(enc, "within_word_l2r", "strided", stride=4)
    assert plan.n_copies == 4
    flat = plan.targets[plan.targets >= 0]
    assert sorted(flat.tolist()) == np.flatnonzero(enc.scorable).tolist()
    exact = make_plan(enc, "within_word_l2r")
    for row, tgts in zip(plan.mask, plan.targets, strict=True):
        for t in tgts[tgts >= 0]:  # each target keeps its exact mask set (and more)
            assert row[exact.mask[exact.targets[:, 0] == t][0]].all()
