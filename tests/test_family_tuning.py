"""The tuners' scopes and the authors' head on every encoder family (tests/families.py).

Each family's tiny random masked LM is wrapped as ``l3m.modeling`` wraps it (classifier + MLM
head sharing one encoder). Child-Tuning_D's scope and weight_mask's masked layers must be the
encoder's layer stack and nothing else, never the MLM head's layers (RoBERTa's
``lm_head.layer_norm``, DistilBERT's ``vocab_layer_norm``); Child-Tuning_F masks the classifier
and never the MLM head. ``model.head: authors`` either computes the authors' head and exports as
the family's plain classifier, or is refused by ``authors_head_unsupported`` naming the family.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import FAMILIES
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BatchEncoding

from l3m.config import TunerSpec
from l3m.modeling import MultiTaskModel, build_multitask_model
from l3m.optim import apply_head, authors_head_unsupported
from l3m.tuning import build_tuner
from l3m.tuning.weight_mask import masked_modules

LABELS = ["a", "b", "c"]
TEXTS = ["we extend the method of prior work to proteins", "results differ from theirs"]
CLF = "classifier_model."

# Where each family's encoder blocks live in its classifier, written out per family so that the
# tests do not share the implementation's structural rule.
LAYER_STACK = {
    "bert": "bert.encoder.layer.",
    "bert-cased": "bert.encoder.layer.",
    "roberta": "roberta.encoder.layer.",
    "xlm-roberta": "roberta.encoder.layer.",
    "deberta-v2": "deberta.encoder.layer.",
    "electra": "electra.encoder.layer.",
    "distilbert": "distilbert.transformer.layer.",
    "albert": "albert.encoder.albert_layer_groups.",
    "mpnet": "mpnet.encoder.layer.",
    "modernbert": "model.layers.",
}
# Parts no tuner scope may reach: MLM heads, embeddings, poolers, task heads.
NEVER_IN_SCOPE = ("lm_head", "cls.predictions", "generator_", "vocab_", "predictions", "embeddings", "pooler",
                  "classifier", "pre_classifier", "head.", "decoder")  # fmt: skip
# Families whose MLM head has parameter names containing the default scope "layer".
MLM_HEAD_LAYER_NAMES = {"roberta", "xlm-roberta", "mpnet", "distilbert"}
# weight_mask also masks a BERT-style pooler's dense layer (the authors absorb it).
ABSORBED_POOLER = {"bert": "bert.pooler.dense", "bert-cased": "bert.pooler.dense"}

# The authors' head at inference is out(tanh(dense(first token))): the (dense, out) modules of
# each family whose head can be made that, and the module whose training mode turns on the
# dropout on the first token.
AUTHORS_HEAD = {
    "bert": ("bert.pooler.dense", "classifier", "bert.pooler"),
    "bert-cased": ("bert.pooler.dense", "classifier", "bert.pooler"),
    "albert": ("albert.pooler", "classifier", "albert.pooler"),
    "deberta-v2": ("pooler.dense", "classifier", "pooler"),
    "roberta": ("classifier.dense", "classifier.out_proj", "classifier"),
    "xlm-roberta": ("classifier.dense", "classifier.out_proj", "classifier"),
    "mpnet": ("classifier.dense", "classifier.out_proj", "classifier"),
}
REFUSED = {"electra", "distilbert", "modernbert"}


def test_every_family_is_covered():
    assert set(LAYER_STACK) == set(FAMILIES) == set(AUTHORS_HEAD) | REFUSED


def _multitask(path: Path, with_mlm: bool = True) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_multitask_model(str(path), LABELS, with_mlm=with_mlm)


def _batch(path: Path) -> BatchEncoding:
    return AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")


def _fisher_batches(path: Path):
    """One training batch of the multi-task model: labelled texts and an MLM copy with one target each."""
    enc = _batch(path)
    mask_id = AutoTokenizer.from_pretrained(path).mask_token_id
    mlm_ids, mlm_labels = enc["input_ids"].clone(), torch.full_like(enc["input_ids"], -100)
    mlm_labels[:, 1], mlm_ids[:, 1] = enc["input_ids"][:, 1], mask_id
    batch = {**enc, "labels": torch.tensor([0, 2]), "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels}
    return lambda: [batch]


def _stack_names(model: MultiTaskModel, family: str) -> set[str]:
    return {CLF + n for n, _ in model.classifier_model.named_parameters() if n.startswith(LAYER_STACK[family])}


def _assert_encoder_layers_only(names: set[str], family: str) -> None:
    assert names, f"{family}: empty scope"
    for name in names:
        inner = name.removeprefix(CLF)
        assert name.startswith(CLF) and inner.startswith(LAYER_STACK[family]), f"{family}: {name}"
        assert not any(part in inner for part in NEVER_IN_SCOPE), f"{family}: {name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_child_d_scope_is_the_encoder_layer_stack(family, family_models):
    model = _multitask(family_models[family])
    if family in MLM_HEAD_LAYER_NAMES:  # a name match over the whole model would pick these up
        head = {n for n, _ in model.named_parameters() if n.startswith("mlm_model.")}
        assert any("layer" in n for n in head), family
    tuner = build_tuner(TunerSpec(kind="child_d", reserve_p=0.3))
    tuner.prepare(model, _fisher_batches(family_models[family]))
    names = set(tuner.child_masks())
    _assert_encoder_layers_only(names, family)
    # The default scope ("layer") is every parameter of the stack: all its names contain it.
    assert names == _stack_names(model, family)
    assert 0 < tuner.child_fraction < 1


@pytest.mark.parametrize("family", FAMILIES)
def test_child_f_masks_the_classifier_never_the_mlm_head(family, family_models):
    model = _multitask(family_models[family])
    tuner = build_tuner(TunerSpec(kind="child_f", reserve_p=0.3))
    tuner.prepare(model)
    chosen = {id(p) for p in tuner._params}
    named = {id(p): n for n, p in model.named_parameters()}
    assert chosen == {id(p) for p in model.classifier_model.parameters()}
    stack = _stack_names(model, family)
    assert stack and stack <= {named[i] for i in chosen}
    mlm_only = {n for n, p in model.named_parameters() if n.startswith("mlm_model.")}
    assert mlm_only, f"{family}: the MLM head has parameters of its own"
    assert not mlm_only & {named[i] for i in chosen}


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_mask_masks_the_encoder_layer_stack(family, family_models):
    model = _multitask(family_models[family])
    clf = model.classifier_model
    stack_linears = {n for n, m in clf.named_modules()
                     if type(m) is nn.Linear and n.startswith(LAYER_STACK[family])}  # fmt: skip
    build_tuner(TunerSpec(kind="weight_mask")).prepare(model)
    masked = set(masked_modules(clf))
    pooler = ABSORBED_POOLER.get(family)
    _assert_encoder_layers_only({CLF + n for n in masked if n != pooler}, family)
    assert masked == stack_linears | ({pooler} if pooler else set())
    # The MLM model shares the encoder: its only masked modules are the shared ones.
    prefix = model.mlm_model.base_model_prefix + "."
    assert all(n.startswith(prefix) for n in masked_modules(model.mlm_model)), family


def _dense_inputs(dense: nn.Module, clf: nn.Module, batch: BatchEncoding, calls: int) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hook = dense.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for _ in range(calls):
                clf(**batch)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("family", sorted(AUTHORS_HEAD))
def test_authors_head_trains_exports_and_reloads(family, family_models, tmp_path):
    path = family_models[family]
    config = AutoConfig.from_pretrained(path)
    assert authors_head_unsupported(config) is None
    assert authors_head_unsupported(config.model_type) is None
    model = _multitask(path, with_mlm=False)
    apply_head(model, "authors")
    clf = model.classifier_model
    dense_name, out_name, head_name = AUTHORS_HEAD[family]
    dense, out = clf.get_submodule(dense_name), clf.get_submodule(out_name)
    batch = _batch(path)

    # Inference: logits = out(tanh(dense(first token))), and no dropout anywhere.
    clf.eval()
    with torch.no_grad():
        first = clf.base_model(**batch)[0][:, 0]
        logits = clf(**batch).logits
        torch.testing.assert_close(logits, out(torch.tanh(dense(first))))
    assert all(torch.equal(x, first) for x in _dense_inputs(dense, clf, batch, 2))
    # Training: the first token goes through dropout before the dense layer.
    clf.get_submodule(head_name).train()
    assert any(not torch.equal(x, first) for x in _dense_inputs(dense, clf, batch, 5)), family

    clf.train()
    loss = clf(**batch, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert dense.weight.grad is not None and dense.weight.grad.abs().sum() > 0

    build_tuner(TunerSpec(kind="full")).export(model, tmp_path / "out")
    served = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(served) is type(clf)
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, clf.eval()(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_authors_head_is_refused_naming_the_family(family, family_models):
    config = AutoConfig.from_pretrained(family_models[family])
    reason = authors_head_unsupported(config)
    assert reason is not None and f"for {config.model_type} " in reason and "model.head: authors" in reason
    assert authors_head_unsupported(config.model_type) == reason
    model = _multitask(family_models[family], with_mlm=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"for {config.model_type} "):
        apply_head(model, "authors")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any change


@pytest.mark.parametrize("model_type", ["gpt2", "clip"])
def test_authors_head_is_refused_for_a_family_without_such_a_head(model_type):
    """A family that matches no rule (GPT-2 scores its last token) or has no classifier at all (CLIP)."""
    reason = authors_head_unsupported(model_type)
    assert reason is not None and f"for {model_type}" in reason


# Each family's attention query and value linears, written out per family; peft ships a default
# for the first six (lora then needs no target_modules), the others must name them.
LORA_QV = {
    "bert": ("attention.self.query", "attention.self.value"),
    "bert-cased": ("attention.self.query", "attention.self.value"),
    "roberta": ("attention.self.query", "attention.self.value"),
    "xlm-roberta": ("attention.self.query", "attention.self.value"),
    "electra": ("attention.self.query", "attention.self.value"),
    "deberta-v2": ("attention.self.query_proj", "attention.self.value_proj"),
    "distilbert": ("attention.q_lin", "attention.v_lin"),
    "albert": ("attention.query", "attention.value"),
    "mpnet": ("attention.attn.q", "attention.attn.v"),
    "modernbert": ("attn.Wqkv",),
}
PEFT_DEFAULT = {"bert", "bert-cased", "roberta", "xlm-roberta", "electra", "deberta-v2"}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapts_the_attention_query_and_value_of_the_layer_stack(family, family_models):
    from peft.tuners.lora import LoraLayer

    model = _multitask(family_models[family])
    clf = model.classifier_model
    want = {n for n, m in clf.named_modules()
            if type(m) is nn.Linear and n.startswith(LAYER_STACK[family]) and n.endswith(LORA_QV[family])}  # fmt: skip
    assert want, family
    if family not in PEFT_DEFAULT:
        with pytest.raises(ValueError, match=f"peft has no default target modules for {clf.config.model_type}"):
            build_tuner(TunerSpec(kind="lora")).prepare(_multitask(family_models[family]))
    targets = None if family in PEFT_DEFAULT else [n.rsplit(".", 1)[-1] for n in LORA_QV[family]]
    build_tuner(TunerSpec(kind="lora", target_modules=targets)).prepare(model)
    assert {n for n, m in clf.named_modules() if isinstance(m, LoraLayer)} == want
    _assert_encoder_layers_only({CLF + n for n in want}, family)
    tok = AutoTokenizer.from_pretrained(family_models[family])
    out = model(**tok(TEXTS, padding=True, return_tensors="pt"), labels=torch.tensor([0, 1]))
    out.loss.backward()  # the adapters are on the classification path
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A" in n), family
