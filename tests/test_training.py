"""A tiny end-to-end training run per strategy: a 2-layer BERT built in the test, a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForMaskedLM

from l3m.config import DomainConfig, MaskingSpec, RunConfig, TunerSpec
from l3m.data.loading import load_domain
from l3m.evaluate import read_predictions
from l3m.modeling import build_multitask_model
from l3m.train import TrainInputs, encode_domain, train_one

WORDS = {
    "pos": "good great fine lovely excellent superb".split(),
    "neg": "bad awful poor terrible dreadful worse".split(),
}


@pytest.fixture(scope="module")
def tiny_model(tiny_mlm_dir):
    """The conftest's 2-layer random BERT MLM with the shared tokenizer."""
    return tiny_mlm_dir


def write_domain(root, name, sizes, row, **domain):
    """A domain of JSONL splits (``sizes``: split -> rows) whose i-th row is ``row(i)``."""
    for split, n in sizes.items():
        with open(root / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                fh.write(json.dumps(row(i)) + "\n")
    return DomainConfig(name=name, data_root=str(root), splits={s: {"path": f"{s}.jsonl"} for s in sizes}, **domain)


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    rng = np.random.default_rng(0)

    def row(i):
        label = ("pos", "neg")[i % 2]
        words = rng.choice(WORDS[label], 4).tolist() + ["the", "film", "was", str(i)]
        return {"text": " ".join(rng.permutation(words)), "label": label}

    return write_domain(tmp_path_factory.mktemp("data"), "toy", {"train": 48, "dev": 16, "test": 16}, row)


def _cfg(domain, tiny_model, tmp_path):
    return RunConfig(domain=domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                     training={"epochs": 2, "batch_size": 8, "lr": 1e-3, "fp16_on_cuda": False},
                     output_dir=str(tmp_path))


def _fake_logp(loaded, tok):
    rng = np.random.default_rng(1)
    out = []
    for row in loaded.dataset["train"]:
        ids = tok(row["text"], truncation=True, max_length=32)["input_ids"]
        special = tok.get_special_tokens_mask(ids, already_has_special_tokens=True)
        out.append(np.where(np.array(special) == 1, np.nan, -rng.gamma(2.0, 2.0, len(ids))).astype(np.float32))
    return out


@pytest.mark.parametrize(
    "kind", ["l3", pytest.param("none", marks=pytest.mark.slow), pytest.param("random", marks=pytest.mark.slow),
             pytest.param("selective", marks=pytest.mark.slow)],
)
def test_train_one_end_to_end(domain, tiny_model, tmp_path, kind):
    cfg = _cfg(domain, tiny_model, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    loaded = load_domain(domain)
    logp = _fake_logp(loaded, tok)
    sel = [(np.nan_to_num(a) < -4).astype(np.float32) for a in logp]
    inputs = TrainInputs(loaded, token_logp=logp, selective_mask=sel, score_key="fake")
    rec = train_one(cfg, MaskingSpec(kind=kind), TunerSpec(), seed=3, inputs=inputs, out_dir=tmp_path / kind)
    assert rec.global_steps == 12  # 48 rows / batch 8 * 2 epochs
    assert set(rec.metrics) == {"dev", "test"} and 0 <= rec.metrics["test"]["macro_f1"] <= 1
    if kind == "none":
        assert rec.masking["selected_tokens"] == 0
    else:
        assert 0 < rec.masking["realised_rate"] < 0.6
    meta = json.loads((tmp_path / kind / "model" / "l3m.json").read_text())
    assert meta["label_names"] == ["neg", "pos"] and meta["strategy"]["kind"] == kind
    assert set(meta["metrics"]["test"]) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix"}
    assert (tmp_path / kind / "run.json").exists() and not (tmp_path / kind / "checkpoints").exists()
    # Serving's view: a plain AutoModelForSequenceClassification reproduces the test metric.
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / kind / "model").eval()
    test = encode_domain(TrainInputs(loaded), tok, 32)["test"]
    with torch.no_grad():
        enc = tok(list(loaded.dataset["test"]["text"]), truncation=True, max_length=32, padding=True, return_tensors="pt")
        pred = clf(**enc).logits.argmax(-1).numpy()
    acc = float((pred == np.array(list(test["label"]))).mean())
    assert acc == pytest.approx(meta["metrics"]["test"]["accuracy"])
    # The offline evaluation's per-example predictions travel with the model (l3m models verify).
    for split in ("dev", "test"):
        recs = read_predictions(tmp_path / kind / "model" / "predictions" / f"{split}.jsonl")
        assert [r["text"] for r in recs] == list(loaded.dataset[split]["text"])
        hits = sum(r["label"] == r["gold"] for r in recs) / len(recs)
        assert hits == pytest.approx(meta["metrics"][split]["accuracy"])
    assert [r["label"] for r in recs] == [meta["label_names"][i] for i in pred]
    # A finished run is not trained again.
    again = train_one(cfg, MaskingSpec(kind=kind), TunerSpec(), seed=3, inputs=inputs, out_dir=tmp_path / kind)
    assert again == rec


def test_shared_encoder_and_pretrained_mlm_head(tiny_model):
    model = build_multitask_model(str(tiny_model), ["a", "b"], with_mlm=True)
    clf, mlm = model.classifier_model, model.mlm_model
    assert mlm.bert is clf.bert
    assert mlm.get_output_embeddings().weight is clf.get_input_embeddings().weight
    ref = BertForMaskedLM.from_pretrained(tiny_model)
    head = dict(mlm.cls.named_parameters())
    for name, p in ref.cls.named_parameters():
        assert torch.equal(head[name], p)  # the MLM head keeps its pretrained weights
    # Gathered-position MLM loss equals transformers' own loss.
    ids = torch.randint(1000, 2000, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    model.eval()
    ours = model.mlm_loss(ids, torch.ones_like(ids), None, labels)
    theirs = mlm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_resume_from_checkpoint(domain, tiny_model, tmp_path):
    """An interrupted run (checkpoints, no run.json) continues from its last checkpoint."""
    cfg = _cfg(domain, tiny_model, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    loaded = load_domain(domain)
    inputs = TrainInputs(loaded, token_logp=_fake_logp(loaded, tok))
    first = train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), 5, inputs, tmp_path / "r", keep_checkpoints=True)
    (tmp_path / "r" / "run.json").unlink()
    again = train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), 5, inputs, tmp_path / "r")
    assert again.global_steps == first.global_steps == 12
    assert again.median_step_seconds == 0.0  # no step was trained again
    assert again.metrics["test"] == first.metrics["test"]


@pytest.mark.slow
def test_unlabelled_corpus_as_extra_mlm_source(domain, tiny_model, tmp_path):
    (tmp_path / "unl.txt").write_text("\n".join(f"an unlabelled film review number {i}" for i in range(30)))
    dom = DomainConfig.model_validate({**domain.model_dump(), "unlabelled": {"path": str(tmp_path / "unl.txt")}})
    cfg = _cfg(dom, tiny_model, tmp_path)
    cfg.training.use_unlabelled = True
    tok = AutoTokenizer.from_pretrained(tiny_model)
    loaded = load_domain(dom)
    from l3m.data.loading import load_unlabelled

    texts = load_unlabelled(dom)
    inputs = TrainInputs(loaded, token_logp=_fake_logp(loaded, tok), unlabelled=texts)
    with pytest.raises(ValueError, match="unlabelled texts"):
        train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), 1, inputs, tmp_path / "fail")
    rec = train_one(cfg, MaskingSpec(kind="random"), TunerSpec(), 1, inputs, tmp_path / "ok")
    # Twice the MLM texts of a plain run: the classification batch's plus as many unlabelled.
    plain = train_one(_cfg(domain, tiny_model, tmp_path), MaskingSpec(kind="random"), TunerSpec(), 1,
                      TrainInputs(loaded), tmp_path / "plain")
    assert rec.masking["content_tokens"] > 1.5 * plain.masking["content_tokens"]
