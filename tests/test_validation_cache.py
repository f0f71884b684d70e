"""The pipeline's validation cache key: reused when nothing changed, not when the data or corpus changed."""

from __future__ import annotations

from l3m.config import RunConfig


def _key(toy_domain, **over: object) -> str:
    from flows.pipeline import validation_cache_key

    cfg = RunConfig.model_validate({"domain": toy_domain(unlabelled={"path": "toy/corpus.txt"}, **over)})
    return validation_cache_key(None, {"cfg": cfg})


def test_validation_cache_key_is_reused_when_nothing_changed(toy_domain):
    (toy_domain.root / "toy" / "corpus.txt").write_text("one text\nanother text\n")
    assert _key(toy_domain) == _key(toy_domain)


def test_validation_cache_key_changes_with_the_corpus_a_split_or_the_cleaning(toy_domain):
    corpus = toy_domain.root / "toy" / "corpus.txt"
    corpus.write_text("one text\nanother text\n")
    before = _key(toy_domain)
    corpus.write_text("one text\n\nanother text\n")  # a blank line: the corpus checks would now warn
    after_corpus = _key(toy_domain)
    assert after_corpus != before
    dev = toy_domain.root / "toy" / "dev.jsonl"
    dev.write_text(dev.read_text() + dev.read_text().splitlines()[0] + "\n")
    assert _key(toy_domain) != after_corpus
    assert _key(toy_domain, cleaning={"eval_splits": True}) != _key(toy_domain)
