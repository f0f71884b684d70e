"""A domain's MLM text transform: the authors' ChemProt preprocessing on the MLM side only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import tiny_model, write_domain  # noqa: F401  (fixture)
from transformers import AutoTokenizer

from l3m import experiment
from l3m.config import DomainConfig, MaskingSpec, RunConfig, TunerSpec, load_config
from l3m.data.loading import load_domain
from l3m.data.snapshot import snapshot_id
from l3m.data.transforms import authors_text, transform_items
from l3m.inputs import current_score_key, mlm_train_items
from l3m.masking import MaskingCollator, build_masking
from l3m.masking.collator import EXAMPLE_ID
from l3m.train import TrainInputs, encode_domain, mlm_side, train_one

MARKED = ("<< {a} >> binds [[ {b} ]], a {c}-like protein.", "[[ {b} ]] inhibits << {a} >> in cells.")


@pytest.fixture(scope="module")
def marked_domain(tmp_path_factory):
    rng = np.random.default_rng(0)

    def row(i):
        a, b, c = rng.choice("kinase receptor aspirin insulin dopamine enzyme".split(), 3)
        return {"text": MARKED[i % 2].format(a=a, b=b, c=c), "label": "ab"[i % 2]}

    return write_domain(tmp_path_factory.mktemp("marked"), "marked", {"train": 32, "dev": 8, "test": 8}, row,
                        mlm_text="authors")


def test_authors_transform_spaces_punctuation_then_strips_markers():
    text = "<< Epidermal growth factor receptor >> inhibitors include [[ gefitinib ]] (Iressa, ZD1839) and OSI-774."
    assert authors_text(text) == " Epidermal growth factor receptor inhibitors include gefitinib (Iressa , ZD1839) and OSI - 774 . "
    assert authors_text("x ([[ Iressa ]], y)") == "x ( Iressa , y)"
    # Their last replace deletes a double space left after collapsing (kept: their scores saw it).
    assert authors_text("a   b") == "ab"
    assert transform_items("raw", [("<< a >>", None)]) == [("<< a >>", None)]
    assert transform_items("authors", [("<< a >>,", "[[ b ]]")]) == [(" a , ", " b ")]


def test_on_in_the_chemprot_paper_profiles_only():
    for name in ("chemprot-roberta", "chemprot-minilm"):
        assert load_config(f"configs/paper/{name}.yaml").domain.mlm_text == "authors"
    for path in ("configs/paper/citation_intent-minilm.yaml", "domains/chemprot.yaml", "configs/demo.yaml"):
        assert load_config(path).domain.mlm_text == "raw", path
    with pytest.raises(ValueError, match="selective"):
        RunConfig(domain=DomainConfig(name="x", mlm_text="authors", splits={"train": {"path": "t.jsonl"}}),
                  strategies=[{"kind": "selective"}])


def test_transform_is_in_mlm_runs_identity_and_the_score_key_not_the_snapshot(marked_domain, tiny_model):  # noqa: F811
    on = RunConfig(domain=marked_domain, model={"name_or_path": str(tiny_model)},
                   strategies=[{"kind": "none"}, {"kind": "random"}, {"kind": "l3"}], training={"seeds": [1]})
    off = on.model_copy(update={"domain": marked_domain.model_copy(update={"mlm_text": "raw"})})
    ids_on = {k.strategy: k.run_id for k, _ in experiment.plan_runs(on, "fp")}
    ids_off = {k.strategy: k.run_id for k, _ in experiment.plan_runs(off, "fp")}
    assert ids_on["none"] == ids_off["none"]  # the classifier reads the same text
    assert ids_on["random"] != ids_off["random"] and ids_on["l3"] != ids_off["l3"]
    assert current_score_key(on) != current_score_key(off)
    assert current_score_key(on) == current_score_key(off) + "+text-authors"
    assert snapshot_id(on.domain) == snapshot_id(off.domain)  # the validated rows do not change


def _fake_logp(tok, items):
    rng = np.random.default_rng(1)
    out = []
    for text, _ in items:
        ids = tok(text, truncation=True, max_length=32)["input_ids"]
        special = tok.get_special_tokens_mask(ids, already_has_special_tokens=True)
        out.append(np.where(np.array(special) == 1, np.nan, -rng.gamma(2.0, 2.0, len(ids))).astype(np.float32))
    return out


def _inputs(marked_domain, tiny_model):  # noqa: F811
    cfg = RunConfig(domain=marked_domain, model={"name_or_path": str(tiny_model), "max_length": 32})
    tok = AutoTokenizer.from_pretrained(tiny_model)
    loaded = load_domain(marked_domain)
    items = mlm_train_items(cfg, loaded)
    return tok, TrainInputs(loaded, token_logp=_fake_logp(tok, items), score_key="fake", mlm_items=items)


def test_the_masked_batch_is_the_transformed_text_the_classifier_the_raw(marked_domain, tiny_model):  # noqa: F811
    tok, inputs = _inputs(marked_domain, tiny_model)
    markers = set(tok.convert_tokens_to_ids(["<", ">", "[", "]"]))
    rows = list(range(inputs.loaded.dataset["train"].num_rows))
    train_ds = encode_domain(inputs, tok, 32)["train"].add_column(EXAMPLE_ID, rows)
    mlm_ds = mlm_side(inputs, train_ds, tok, 32, rows)
    assert mlm_ds["token_logp"] is not None and mlm_ds[EXAMPLE_ID] == rows
    twins = {int(f[EXAMPLE_ID]): f for f in mlm_ds}
    collator = MaskingCollator(tok, build_masking(MaskingSpec(kind="l3", rate=0.3)), seed=1, mlm_twins=twins)
    batch = collator([train_ds[i] for i in (3, 0, 5)])
    assert markers & set(batch["input_ids"].flatten().tolist())  # the classifier sees the markers
    kept = batch["mlm_input_ids"][batch["mlm_labels"] == -100]
    assert not markers & set(kept.tolist()) and not markers & set(batch["mlm_labels"].flatten().tolist())
    want = tok([inputs.mlm_items[i][0] for i in (3, 0, 5)], truncation=True, max_length=32, padding=True,
               return_tensors="pt")
    assert torch.equal(batch["mlm_attention_mask"], want["attention_mask"])
    restored = torch.where(batch["mlm_labels"] == -100, batch["mlm_input_ids"], batch["mlm_labels"])
    assert torch.equal(restored, want["input_ids"])


@pytest.mark.parametrize("mlm_batch", ["same", "independent"])
def test_train_one_with_the_transform(marked_domain, tiny_model, tmp_path, mlm_batch):  # noqa: F811
    _, inputs = _inputs(marked_domain, tiny_model)
    cfg = RunConfig(domain=marked_domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                    training={"epochs": 1, "batch_size": 8, "fp16_on_cuda": False, "mlm_batch": mlm_batch},
                    output_dir=str(tmp_path))
    rec = train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), seed=2, inputs=inputs, out_dir=tmp_path / "run")
    assert rec.global_steps == 4 and 0 < rec.masking["realised_rate"] < 0.6


def test_the_data_identity_is_the_corpus_as_shipped(marked_domain, tiny_model, tmp_path):  # noqa: F811
    """With the unlabelled corpus in the runs, switching the MLM transform must not move STL runs:
    the data fingerprint hashes the corpus as shipped; the transform is recorded on its own."""
    from l3m.inputs import prepare_inputs

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("<< kinase >> binds [[ insulin ]], a dopamine-like protein.\nplain text here.\n")
    on_domain = DomainConfig.model_validate({**marked_domain.model_dump(), "unlabelled": {"path": str(corpus)}})
    on = RunConfig(domain=on_domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                   strategies=[{"kind": "none"}], training={"seeds": [1], "use_unlabelled": True})
    off = on.model_copy(update={"domain": on_domain.model_copy(update={"mlm_text": "raw"})})
    quiet = lambda _: None  # noqa: E731
    assert prepare_inputs(on, log=quiet).data_fingerprint == prepare_inputs(off, log=quiet).data_fingerprint
