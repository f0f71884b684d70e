"""Collator contract over every registered masking strategy, and the L3 / RTM specifics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from l3m.config import DEFAULT_SHARED, MaskingSpec
from l3m.masking import MaskingCollator, build_masking, registered_kinds
from l3m.masking.collator import first_token_of_word
from l3m.masking.l3 import calibrated_probs, paper_probs, surprisal

MODEL = DEFAULT_SHARED / "models" / "minilm-l6-mlm"
TEXTS = [
    "Thus, over the past few years, statistical methods for parsing have advanced quickly.",
    "We follow the approach of Collins (1997) and extend it to unlexicalised grammars.",
    "Short one.",
    "Citation intent classification assigns a function such as background, uses or extends to a citation.",
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL)


def _features(tok, texts=TEXTS, seed=0):
    rng = np.random.default_rng(seed)
    feats = []
    for i, t in enumerate(texts):
        enc = tok(t, truncation=True, max_length=64)
        special = tok.get_special_tokens_mask(enc["input_ids"], already_has_special_tokens=True)
        logp = np.where(np.array(special) == 1, np.nan, -rng.gamma(2.0, 2.0, len(special))).astype(np.float32)
        sel = (rng.random(len(special)) < 0.2).astype(np.float32)
        words = [-1 if w is None else w for w in enc.word_ids()]
        feats.append({**enc, "label": i % 2, "token_logp": logp.tolist(), "selective_mask": sel.tolist(), "word_ids": words})
    return feats


@pytest.mark.parametrize("kind", registered_kinds())
@pytest.mark.parametrize("whole_word", [False, True])
def test_collator_contract(tok, kind, whole_word):
    strategy = build_masking(MaskingSpec(kind=kind, whole_word=whole_word, rate=0.3))
    feats = _features(tok)
    out = MaskingCollator(tok, strategy, seed=7)(feats)
    B, L = out["input_ids"].shape
    assert B == len(TEXTS) and out["labels"].tolist() == [0, 1, 0, 1]
    assert out["attention_mask"].shape == (B, L)
    if not strategy.uses_mlm:
        assert "mlm_input_ids" not in out and "mlm_labels" not in out
        return
    ids, mlm_ids, mlm_labels = out["input_ids"], out["mlm_input_ids"], out["mlm_labels"]
    assert mlm_ids.shape == mlm_labels.shape == (B, L)
    special = torch.tensor([tok.get_special_tokens_mask(r, already_has_special_tokens=True) for r in ids.tolist()]).bool()
    special |= out["attention_mask"] == 0
    # Specials and padding are never selected, never changed.
    assert (mlm_labels[special] == -100).all()
    assert torch.equal(mlm_ids[special], ids[special])
    # Labels carry the original token where selected, -100 elsewhere; unselected tokens unchanged.
    sel = mlm_labels != -100
    assert torch.equal(mlm_labels[sel], ids[sel])
    assert torch.equal(mlm_ids[~sel], ids[~sel])
    # The classification input stays clean.
    assert tok.mask_token_id not in ids.tolist()[0]
    # Seeded determinism: same seed same batch, another seed another batch.
    again = MaskingCollator(tok, strategy, seed=7)(_features(tok))
    assert torch.equal(again["mlm_input_ids"], mlm_ids) and torch.equal(again["mlm_labels"], mlm_labels)
    if kind != "selective":  # a fixed selection: only the 80/10/10 part varies with the seed
        other = [MaskingCollator(tok, strategy, seed=s)(_features(tok))["mlm_labels"] for s in range(8, 12)]
        assert any(not torch.equal(o, mlm_labels) for o in other)


def test_random_equals_hf_collator(tok):
    feats = [{"input_ids": tok(t)["input_ids"]} for t in TEXTS * 8]
    hf = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, seed=123)
    ours = MaskingCollator(tok, build_masking(MaskingSpec(kind="random", rate=0.15)), seed=123)
    for _ in range(3):  # several batches: the generators must stay in step
        a, b = hf([dict(f) for f in feats]), ours([dict(f) for f in feats])
        assert torch.equal(a["input_ids"], b["mlm_input_ids"])
        assert torch.equal(a["labels"], b["mlm_labels"])


def _synthetic_logp(B=64, L=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, L, (B,), generator=g)
    content = torch.arange(L)[None, :] < lengths[:, None]
    # Heavy-tailed surprisal so the cap at 1 bites in paper mode.
    s = torch.distributions.Exponential(0.3).sample((B, L)) ** 2
    return torch.where(content, -s, torch.full_like(s, float("nan"))), content


def test_calibrated_rate_is_r_and_paper_falls_short():
    logp, content = _synthetic_logp()
    s = surprisal(logp, content)
    r = 0.15
    cal, pap = calibrated_probs(s, content, r), paper_probs(s, content, r)
    n = content.sum(1).float()
    assert torch.allclose(cal.sum(1), r * n, atol=1e-3)
    assert (cal <= 1).all() and (cal >= 0).all() and (cal[~content] == 0).all()
    assert pap.sum() < cal.sum() - 1.0  # clipping loses mass in the authors' mapping
    # Realised rate when sampling through the collator's Bernoulli: within 1 point of r.
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([torch.bernoulli(cal, generator=g) for _ in range(50)])
    realised = draws.sum() / (content.sum() * 50)
    assert abs(realised.item() - r) < 0.01


def test_probability_order_follows_surprisal():
    logp, content = _synthetic_logp(B=16)
    s = surprisal(logp, content)
    for probs in (calibrated_probs(s, content, 0.15), paper_probs(s, content, 0.15)):
        for row in range(16):
            c = content[row]
            order = torch.argsort(s[row][c])
            p_sorted = probs[row][c][order]
            assert (p_sorted[1:] >= p_sorted[:-1] - 1e-6).all()  # non-decreasing in surprisal
    # Unclipped tokens are exactly proportional to surprisal.
    p = paper_probs(s, content, 0.15)[0]
    c = content[0] & (p < 1)
    ratio = p[c] / s[0][c]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)


def test_l3_collator_reports_realised_rate(tok):
    strategy = build_masking(MaskingSpec(kind="l3", mode="calibrated", rate=0.15))
    coll = MaskingCollator(tok, strategy, seed=0)
    feats = _features(tok, TEXTS * 16)
    for _ in range(20):
        coll(feats)
    assert abs(coll.stats.expected_rate - 0.15) < 1e-3
    assert abs(coll.stats.realised_rate - 0.15) < 0.01


def test_whole_word_draws_once_per_word(tok):
    word_ids = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1]])
    assert first_token_of_word(word_ids).tolist() == [[0, 1, 1, 3, 4, 4, 4, 7]]
    strategy = build_masking(MaskingSpec(kind="l3", whole_word=True, rate=0.3))
    feats = _features(tok, ["unlexicalised grammars parse hyperparameterisation tokenizers"] * 32)
    out = MaskingCollator(tok, strategy, seed=1)(feats)
    words = torch.tensor([f["word_ids"] for f in feats])
    sel = out["mlm_labels"] != -100
    for w in range(int(words.max()) + 1):
        in_w = words == w
        per_row = sel[in_w].view(len(feats), -1)
        assert (per_row.all(1) | ~per_row.any(1)).all()  # all subwords of a word or none


class _CountingClassifier(torch.nn.Module):
    """P(label 1) = sigmoid(number of occurrences of ``hit`` in the unpadded input)."""

    def __init__(self, hit):
        super().__init__()
        self.hit = hit

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        from types import SimpleNamespace

        hits = ((input_ids == self.hit) & (attention_mask == 1)).sum(1).float()
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(hits), hits], dim=1))


def test_selective_prefix_gains_batched_and_capped(tok):
    from l3m.masking.selective import _prefix_rows, compute_selective_masks, is_stopword, prefix_gold_probs

    rows = _prefix_rows([101, 5, 6, 102, 7, 102], [1, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1])
    assert [r[0] for r in rows] == [[101, 102, 102], [101, 5, 102, 102], [101, 5, 6, 102, 102], [101, 5, 6, 102, 7, 102]]
    assert rows[1][1] == [0, 0, 0, 1]  # token types follow their tokens
    assert is_stopword("the") and is_stopword("##,") and not is_stopword("parsing")
    hit = tok.convert_tokens_to_ids("language")
    ids = [101, 1996, hit, 3000, hit, 4000, 102]  # [CLS] the language paris language tears [SEP]
    encs = [{"input_ids": ids}, {"input_ids": ids[:4] + [102]}]
    model = _CountingClassifier(hit)
    big = prefix_gold_probs(model, tok, encs, [1, 0], token_budget=10_000)
    small = prefix_gold_probs(model, tok, encs, [1, 0], token_budget=8)  # many tiny batches
    assert all(np.allclose(a, b) for a, b in zip(big, small, strict=True))
    assert len(big[0]) == 6 and np.all(np.diff(big[0])[[1, 3]] > 0.05)  # gains at the two hits
    masks = compute_selective_masks(model, tok, [{"input_ids": ids}], [1], rate=0.5, delta=0.01)
    assert masks[0].tolist() == [0, 0, 1, 0, 1, 0, 0]
    capped = compute_selective_masks(model, tok, [{"input_ids": ids}], [1], rate=0.25, delta=0.01)
    assert capped[0].tolist() == [0, 0, 1, 0, 0, 0, 0]  # the larger gain wins (0.5 -> 0.73 beats 0.73 -> 0.88)
    # Gold label 0: the hits lower its probability, so nothing is important; "the" is a stopword anyway.
    assert compute_selective_masks(model, tok, [{"input_ids": ids}], [0], rate=0.5, delta=0.0)[0].sum() == 0


@pytest.mark.parametrize("kind", ["random", "l3", "selective"])
def test_mlm_pool_adds_unlabelled_texts(tok, kind):
    strategy = build_masking(MaskingSpec(kind=kind, rate=0.3))
    feats = _features(tok)
    pool = [{k: v for k, v in f.items() if k not in ("label", "selective_mask")}
            for f in _features(tok, ["An unlabelled in-domain sentence about parsing and tagging models."] * 5, seed=3)]
    out = MaskingCollator(tok, strategy, seed=0, mlm_pool=pool, pool_per_batch=3)(feats)
    B = len(feats)
    assert out["input_ids"].shape[0] == B and out["labels"].shape == (B,)
    assert out["mlm_input_ids"].shape[0] == B + 3 and out["mlm_attention_mask"].shape == out["mlm_input_ids"].shape
    sel = out["mlm_labels"] != -100
    assert not sel[out["mlm_attention_mask"] == 0].any()
    if kind == "selective":  # the unlabelled rows carry no selection: never masked
        assert not sel[B:].any()
    else:
        assert sel[B:].any()


def test_independent_mlm_batch_is_drawn_from_the_pool_alone(tok):
    strategy = build_masking(MaskingSpec(kind="l3", rate=0.3))
    feats = _features(tok)
    pool = _features(tok, ["A different sentence drawn on its own for the masked LM task."] * 4, seed=5)
    out = MaskingCollator(tok, strategy, seed=0, mlm_pool=pool, independent_mlm=True)(feats)
    B = len(feats)
    assert out["labels"].shape == (B,) and out["mlm_input_ids"].shape[0] == B
    # Every MLM row is a pool text (the labels hold the original ids), none the batch's own.
    pool_ids = {tuple(p["input_ids"]) for p in pool}
    restored = torch.where(out["mlm_labels"] != -100, out["mlm_labels"], out["mlm_input_ids"])
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(restored, out["mlm_attention_mask"], strict=True)}
    assert rows <= pool_ids and not rows & {tuple(f["input_ids"]) for f in feats}
