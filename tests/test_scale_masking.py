"""Masking under data parallelism: an example's masks do not depend on its batch or process.

The DDP launch (tests/test_scale_ddp.py) gives each rank half of the batches; here the same
split is done by hand: the examples collated by two collators (two "ranks", other batch
partners, other padding, other order) get exactly the masks one collator gives them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from l3m.config import DEFAULT_SHARED, MaskingSpec
from l3m.masking import MaskingCollator, build_masking
from l3m.masking.collator import EXAMPLE_ID

MODEL = DEFAULT_SHARED / "models" / "minilm-l6-mlm"
WORDS = "the model parses citation intent with statistical methods over sentences quickly".split()


@pytest.fixture(scope="module")
def features():
    tok = AutoTokenizer.from_pretrained(MODEL)
    rng = np.random.default_rng(0)
    feats = []
    for i in range(12):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 20))))
        enc = tok(text, truncation=True, max_length=48, return_special_tokens_mask=True)
        special = np.array(enc["special_tokens_mask"])
        logp = np.where(special == 1, np.nan, -rng.gamma(2.0, 2.0, len(special))).astype(np.float32)
        feats.append({**enc, "label": i % 2, "token_logp": logp.tolist(), EXAMPLE_ID: 100 + i})
    return tok, feats


def _masks(collator: MaskingCollator, batch: list[dict]) -> dict[int, tuple[list[int], list[int]]]:
    out = collator(batch)
    masks = {}
    for row, f in enumerate(batch):
        n = len(f["input_ids"])
        masks[f[EXAMPLE_ID]] = (out["mlm_input_ids"][row, :n].tolist(), out["mlm_labels"][row, :n].tolist())
    return masks


@pytest.mark.parametrize("kind", ["random", "l3"])
def test_two_ranks_mask_each_example_as_one_process_does(features, kind):
    tok, feats = features
    strategy = build_masking(MaskingSpec(kind=kind, rate=0.3))
    single = MaskingCollator(tok, strategy, seed=5)
    rank0, rank1 = MaskingCollator(tok, strategy, seed=5), MaskingCollator(tok, strategy, seed=5)
    for epoch in range(2):  # the next epoch draws new masks, on any rank
        single.epoch = rank0.epoch = rank1.epoch = epoch
        one: dict = {}
        for i in range(0, 12, 4):
            one |= _masks(single, feats[i : i + 4])
        two = _masks(rank1, feats[9:12] + feats[0:2]) | _masks(rank0, feats[2:9][::-1])
        assert one == two
        assert any(lab != -100 for _, labels in one.values() for lab in labels)
    # Another epoch masks anew (the epoch is part of the key), the same epoch alike.
    first = _masks(MaskingCollator(tok, strategy, seed=5), feats)
    assert first != _masks(single, feats)
    single.epoch = 0
    assert first == _masks(single, feats)


def test_keyed_masks_depend_on_the_seed_and_keep_the_masking_rate(features):
    tok, feats = features
    strategy = build_masking(MaskingSpec(kind="random", rate=0.3))
    a = _masks(MaskingCollator(tok, strategy, seed=1), feats)
    assert a != _masks(MaskingCollator(tok, strategy, seed=2), feats)
    coll = MaskingCollator(tok, strategy, seed=3)
    for epoch in range(40):
        coll.epoch = epoch
        coll(feats)
    assert coll.stats.realised_rate == pytest.approx(0.3, abs=0.03)


def test_padding_is_never_masked_on_the_keyed_path(features):
    tok, feats = features
    out = MaskingCollator(tok, build_masking(MaskingSpec(kind="random", rate=0.9)), seed=0)(feats)
    pad = out["attention_mask"] == 0
    assert bool(pad.any()) and bool((out["mlm_labels"][pad] == -100).all())
    assert torch.equal(out["mlm_input_ids"][pad], out["input_ids"][pad])
