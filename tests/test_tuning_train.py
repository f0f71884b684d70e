"""Every tuner through the real training entry point (l3m.train.train_one), with L3 masking.

A 2-layer BERT with the shared tokenizer, the 60-row toy domain, 1 epoch: checks the hooks are
wired where training runs them (prepare before the Trainer, callbacks, optimizer groups,
checkpoint restore at the best dev epoch, export) and that what was exported is what trained.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_tuning import save_tiny_base
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from l3m.config import DEFAULT_SHARED, DomainConfig, MaskingSpec, RunConfig, TunerSpec
from l3m.tuning import build_tuner, load_trained, registered_tuners

train = pytest.importorskip("l3m.train")
loading = pytest.importorskip("l3m.data.loading")


@pytest.fixture
def setup(tmp_path_factory, toy_domain):
    """The tiny BERT with the shared tokenizer, the conftest toy domain, fake L3 scores."""
    tok = AutoTokenizer.from_pretrained(DEFAULT_SHARED / "models" / "minilm-l6-mlm")
    model_dir = save_tiny_base(tmp_path_factory.mktemp("tiny-bert"), vocab_size=tok.vocab_size)
    tok.save_pretrained(model_dir)
    domain = DomainConfig(**toy_domain())
    loaded = loading.load_domain(domain)
    rng = np.random.default_rng(0)
    logp = []
    for row in loaded.dataset["train"]:
        ids = tok(row["text"], truncation=True, max_length=32)["input_ids"]
        special = np.array(tok.get_special_tokens_mask(ids, already_has_special_tokens=True))
        logp.append(np.where(special == 1, np.nan, -rng.gamma(2.0, 2.0, len(ids))).astype(np.float32))
    return model_dir, domain, train.TrainInputs(loaded, token_logp=logp, score_key="fake")


@pytest.mark.slow
@pytest.mark.parametrize("kind", registered_tuners())
def test_every_tuner_through_train_one(setup, tmp_path, kind):
    model_dir, domain, inputs = setup
    cfg = RunConfig(domain=domain, model={"name_or_path": str(model_dir), "max_length": 32},
                    training={"epochs": 1, "batch_size": 8, "lr": 1e-3, "fp16_on_cuda": False},
                    output_dir=str(tmp_path))
    spec = TunerSpec(kind=kind, mask_lr=1e-2)
    rec = train.train_one(cfg, MaskingSpec(kind="l3"), spec, seed=3, inputs=inputs, out_dir=tmp_path / kind)
    assert rec.global_steps == 8 and rec.tuner == kind
    out = tmp_path / kind / "model"
    served = load_trained(out)  # full weights, or (lora) rebuilt over the base its l3m.json names
    tok = AutoTokenizer.from_pretrained(out)
    texts = list(inputs.loaded.dataset["test"]["text"])
    enc = tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = served(**enc).logits
    acc = float((pred.argmax(-1).numpy() == np.array(inputs.loaded.dataset["test"]["label"])).mean())
    assert acc == pytest.approx(rec.metrics["test"]["accuracy"])  # the exported model is the evaluated one
    # The tuner's footprint on the trained encoder weights, compared with the base checkpoint.
    base = dict(AutoModelForSequenceClassification.from_pretrained(model_dir).named_parameters())
    # lora keeps each adapted linear as ``<name>.base_layer``: compare under the plain names.
    trained = {n.replace(".base_layer.", "."): p for n, p in served.named_parameters() if ".lora_" not in n}
    def changed_share(names: list[str]) -> float:
        return sum(int((trained[n] != base[n]).sum()) for n in names) / sum(trained[n].numel() for n in names)

    scope = [n for n in trained if "layer" in n]  # child_d's default scope: the encoder layers
    layer = [n for n in scope if n.endswith("weight") and "LayerNorm" not in n]  # their linear weights
    changed = changed_share(layer)
    if kind == "weight_mask":
        for n in layer:  # every weight is either the pretrained value or masked to zero
            assert torch.all((trained[n] == base[n]) | (trained[n] == 0)), n
        assert torch.equal(trained["bert.embeddings.word_embeddings.weight"],
                           base["bert.embeddings.word_embeddings.weight"])
        assert 0 < changed < 0.2  # ~5% initial sparsity, moved by training
        with torch.no_grad():
            rebuilt = build_tuner(spec).rebuild(model_dir, out)(**enc).logits
        assert torch.equal(rebuilt, pred)
    elif kind == "lora":  # the pretrained weights are untouched; the adapters carry the change
        assert changed == 0 and any(".lora_B" in n and p.abs().sum() > 0 for n, p in served.named_parameters())
    elif kind == "child_d":
        assert 0.25 < changed_share(scope) <= 0.3  # only the child network (reserve_p = 0.3) moved
    else:
        assert changed > 0.9
