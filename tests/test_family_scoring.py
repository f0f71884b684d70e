"""Scoring any masked LM: every encoder family of tests/families.py, packed vs generic vs reference.

The reference is minicons' algorithm written out plainly: one masked copy at a time through the
model's full forward, log-softmax over the whole vocabulary, the target's entry. The shared
model's parity with minicons itself is in test_scoring.py.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from families import FAMILIES
from test_scoring import one_thread  # noqa: F401  (fixture)

from l3m.scoring import PLLScorer, make_plan
from l3m.scoring.plans import EncodedText, encode

ITEMS = [
    ("The first text has several words in it, unbelievably (Collins, 1997).", "with a pair of words"),
    ("another, shorter text", None),
    ("Unbelievably tokenized subwords everywhere: post-edits by MERT.", None),
    ("x", None),
]
PACKED = {"bert", "bert-cased", "roberta", "xlm-roberta", "electra"}
TOL = 1e-4  # nats


def reference(path: Path, encs: list[EncodedText], metric: str) -> list[np.ndarray]:
    """One masked copy per target through ``model(...)``, full-vocabulary log-softmax (minicons' way)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    out = []
    for e in encs:
        plan = make_plan(e, metric)  # type: ignore[arg-type]
        s = np.full(e.length, np.nan, dtype=np.float32)
        for mask, tgt in zip(plan.mask, plan.targets, strict=True):
            ids = torch.from_numpy(e.input_ids.copy())
            ids[torch.from_numpy(mask)] = tok.mask_token_id
            kw = {"input_ids": ids[None]}
            if takes_types and e.token_type_ids is not None:
                kw["token_type_ids"] = torch.from_numpy(e.token_type_ids)[None]
            with torch.no_grad():
                logp = model(**kw).logits[0].float().log_softmax(-1)
            t = int(tgt[0])
            s[t] = logp[t, int(e.input_ids[t])]
        out.append(s)
    return out


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.isnan(x), np.isnan(y))
    return max(float(np.nanmax(np.abs(x - y))) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_generic_and_reference_agree(family_models, family: str, one_thread):  # noqa: F811
    path = family_models[family]
    auto = PLLScorer(str(path), dtype="float32", device="cpu")
    generic = PLLScorer(str(path), dtype="float32", device="cpu", packed=False)
    # The scorer picks its path itself and says why.
    assert auto.path == ("packed" if family in PACKED else "generic"), auto.path_reason
    assert generic.path == "generic" and "own forward" in generic.path_reason
    assert type(auto.model).__name__ in auto.path_reason
    for metric in ("within_word_l2r", "original"):
        kw = {"metric": metric, "max_length": 48, "token_budget": 300}
        encs = auto.encode(ITEMS, 48)
        ref = reference(path, encs, metric)
        a, g = auto.score(ITEMS, **kw), generic.score(ITEMS, **kw)
        assert max_diff(a, g) <= TOL and max_diff(g, ref) <= TOL
        s_a = auto.score(ITEMS, **kw, mode="strided", stride=3)
        s_g = generic.score(ITEMS, **kw, mode="strided", stride=3)
        assert max_diff(s_a, s_g) <= TOL


def _word_starts(enc: EncodedText) -> list[int]:
    """Scorable positions that begin a word in the within_word_l2r plan."""
    return [p for p in np.flatnonzero(enc.scorable).tolist() if p == 0 or enc.word_end[p - 1] < p]


@pytest.mark.parametrize("family,marker", [("bert", "##"), ("roberta", "Ġ"), ("xlm-roberta", "▁"),
                                           ("deberta-v2", "▁"), ("modernbert", "Ġ")])  # fmt: skip
def test_word_boundaries_follow_each_tokenizers_markers(family_models, family: str, marker: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_models[family])
    text = "Unbelievably tokenized subwords everywhere"
    enc = encode(tok, [(text, None)], 64)[0]
    pieces = tok.convert_ids_to_tokens(enc.input_ids.tolist())
    starts = _word_starts(enc)
    scorable = np.flatnonzero(enc.scorable).tolist()
    for p in scorable:
        piece = pieces[p]
        begins = piece.startswith(marker) if marker != "##" else not piece.startswith("##")
        if p == scorable[0]:
            begins = True  # the text's first piece (byte-level BPE adds no "Ġ" to it)
        assert (p in starts) == begins, (family, pieces, p)
    assert len(starts) == len(text.split())
    # within_word_l2r masks the rest of the word: the first piece's mask runs to the word's end.
    plan = make_plan(enc, "within_word_l2r")
    first = plan.mask[0]
    assert first.sum() == starts[1] - starts[0]


def test_word_starts_from_markers_without_a_pre_tokenizer(shared_data: Path):
    """A SentencePiece conversion that marks words in the normalizer has no pre-tokenizer: one
    word per sequence by word_ids(); the "▁" pieces then give the word starts."""
    from families import SPECIALS, corpus, train_tokenizer
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    sp = SPECIALS["roberta"]
    tok = train_tokenizer("unigram", sp, list(corpus(shared_data, 500)))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token=sp["cls"], sep_token=sp["sep"],
                                   mask_token=sp["mask"], pad_token=sp["pad"], unk_token=sp["unk"])  # fmt: skip
    text = "the model scores tokens"
    enc = encode(fast, [(text, "and a pair")], 64)[0]
    pieces = fast.convert_ids_to_tokens(enc.input_ids.tolist())
    starts = _word_starts(enc)
    assert len(starts) == len(text.split()) + 3
    assert all(pieces[p].startswith("▁") for p in starts)


def test_generic_path_pads_little_and_bounds_its_logits(family_models, one_thread, monkeypatch):  # noqa: F811
    """Length-sorted batches: padding stays a small share; the [rows, vocab] logits are capped."""
    import l3m.scoring.generic as generic

    monkeypatch.setitem(generic.LOGITS_BYTES, "cpu", 40 * 4 * 800)  # 40 target rows of an 800 vocabulary
    scorer = PLLScorer(str(family_models["modernbert"]), dtype="float32", device="cpu")
    assert scorer.max_targets == 40
    texts = [" ".join(["word"] * n) + " end" for n in (3, 30, 7, 19, 11, 25, 2, 14)]
    seen: list[int] = []
    real = scorer.generic.logprobs  # type: ignore[union-attr]

    def spy(kw, rows, slots, target_ids):
        seen.append(int(rows.shape[0]))
        return real(kw, rows, slots, target_ids)

    monkeypatch.setattr(scorer.generic, "logprobs", spy)
    out = scorer.score(texts, metric="original", max_length=64, token_budget=400)
    assert all(np.isfinite(o[1:-1]).all() for o in out)
    assert max(seen) <= 40 and sum(seen) == sum(int(np.isfinite(o).sum()) for o in out)
    assert scorer.stats.padded_tokens <= 1.15 * scorer.stats.copy_tokens


def test_a_head_that_is_not_position_wise_falls_back_to_full_logits(family_models):
    """The hook is checked against the model's unhooked forward: a head that mixes positions
    (here: adds the sequence mean) would score differently, so the full logits are used."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = family_models["modernbert"]
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    head = model.head
    orig = head.forward
    head.forward = lambda x: orig(x + x.mean(dim=1, keepdim=True))  # type: ignore[method-assign]
    scorer = PLLScorer(model, AutoTokenizer.from_pretrained(path), dtype="float32", device="cpu")
    assert scorer.path == "generic-full-logits" and "not position-wise" in scorer.path_reason
    got = scorer.score(ITEMS[1:3], metric="original", max_length=32)
    assert all(np.isfinite(g[1:-1]).all() for g in got)


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "bpe.codes", "spm.model", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja"]  # fmt: skip


def test_identity_covers_every_tokenizer_file(family_models, tmp_path: Path):
    """Changing (or adding) any file a tokenizer may load gives new score keys and new run ids;
    a file no tokenizer reads (a README) changes neither."""
    import shutil

    from l3m import experiment
    from l3m.config import RunConfig
    from l3m.scoring.keys import scorer_key

    def keys(model: Path) -> tuple[str, set[str]]:
        cfg = RunConfig(domain={"name": "toy", "splits": {"train": {"path": "x.jsonl"}}, "metric": "accuracy"},
                        model={"name_or_path": str(model), "max_length": 32},
                        strategies=[{"kind": "none"}, {"kind": "l3"}], training={"seeds": [1]})  # fmt: skip
        return (scorer_key(str(model), None, "within_word_l2r", 32, "exact", 4),
                {k.run_id for k, _ in experiment.plan_runs(cfg, "data")})

    base_dir = tmp_path / "base"
    shutil.copytree(family_models["xlm-roberta"], base_dir)
    base = keys(base_dir)
    for i, name in enumerate(TOKENIZER_FILES):
        changed = tmp_path / f"changed-{i}"
        shutil.copytree(base_dir, changed)
        with open(changed / name, "ab") as fh:  # appended to an existing file, or a new one
            fh.write(b"\n")
        new = keys(changed)
        assert new[0] != base[0] and not (new[1] & base[1]), name
    (base_dir / "README.md").write_text("a model card\n")
    assert keys(base_dir) == base


def test_a_model_load_logs_one_line_and_the_table_at_debug(family_models):
    import logging

    from transformers import AutoModelForSequenceClassification

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    seen, debug = Keep(), Keep()
    logging.getLogger("transformers").addHandler(seen)
    logging.getLogger("l3m.loads").addHandler(debug)
    logging.getLogger("l3m.loads").setLevel(logging.DEBUG)
    try:
        AutoModelForSequenceClassification.from_pretrained(family_models["modernbert"], num_labels=3)
    finally:
        logging.getLogger("transformers").removeHandler(seen)
        logging.getLogger("l3m.loads").removeHandler(debug)
    reports = [r.getMessage() for r in seen.records if "ModernBertForSequenceClassification" in r.getMessage()]
    assert len(reports) == 1 and "\n" not in reports[0], reports
    newly = reports[0].split("newly initialised ")[1].split(" (full report")[0]
    assert set(newly.split(", ")) == {"classifier.weight", "classifier.bias"}, reports[0]  # in any order
    assert "not used decoder.bias" in reports[0]
    assert any("LOAD REPORT" in r.getMessage() and "MISSING" in r.getMessage() for r in debug.records)


def test_measuring_a_long_texts_length_does_not_warn(family_models):
    """The long-text bound measures untruncated lengths on purpose: no "Token indices ..." warning."""
    import logging

    from transformers import AutoTokenizer

    from serving.textbound import _truncated_flags, content_tokens

    tok = AutoTokenizer.from_pretrained(family_models["roberta"])
    text = "word " * 400
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert content_tokens(tok, text) > tok.model_max_length
        ids = tok([text], truncation=True, max_length=32)["input_ids"]
        assert _truncated_flags(tok, 32, [text], None, ids, [False]) == [True]
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in records if "Token indices" in m]
