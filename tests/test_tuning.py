"""Contracts every registered tuner meets, and the Child-Tuning behaviours (Xu et al. 2021).

All on a 2-layer config-built BERT saved as an MLM "base" checkpoint, wrapped like the
multi-task model (classifier + MLM head sharing the encoder), trained through a real
transformers Trainer so the callbacks run where training runs them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from l3m.config import TunerSpec
from l3m.tuning import build_tuner, find_classifier, register_tuner, registered_tuners
from l3m.tuning.base import Tuner
from l3m.tuning.child_d import estimate_fisher, select_child, split_examples
from l3m.tuning.child_f import ChildFCallback

VOCAB, LABELS = 64, 3


def save_tiny_base(path: Path, vocab_size: int = VOCAB) -> Path:
    """A tiny MLM checkpoint (like the real one: no pooler weights in it)."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"))


class TinyMultiTask(nn.Module):
    """Classifier + pretrained MLM head on one encoder: the shape of l3m.modeling's model."""

    def __init__(self, base: Path) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.classifier_model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=LABELS)
        self.mlm_head = BertForMaskedLM.from_pretrained(base).cls

    def forward(self, input_ids, attention_mask, labels, mlm_labels=None, **_):
        out = self.classifier_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                    output_hidden_states=True)
        loss = out.loss
        if mlm_labels is not None:
            logits = self.mlm_head(out.hidden_states[-1])
            loss = loss + nn.functional.cross_entropy(logits.view(-1, VOCAB), mlm_labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=out.logits)


def make_examples(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (length,), generator=g)
        mlm = torch.full((length,), -100)
        mlm[1] = ids[1]  # at least one MLM target per text: the loss stays finite per example
        rows.append({"input_ids": ids, "labels": int(torch.randint(0, LABELS, (1,), generator=g)),
                     "mlm_labels": mlm})
    return rows


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    mlm = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], att[i, :n], mlm[i, :n] = r["input_ids"], 1, r["mlm_labels"]
    return {"input_ids": ids, "attention_mask": att, "mlm_labels": mlm,
            "labels": torch.tensor([r["labels"] for r in rows])}


def fisher_batches():
    rows = make_examples(8, seed=5)
    return lambda: (collate(rows[i : i + 4]) for i in range(0, 8, 4))


def train(model: nn.Module, tuner: Tuner, tmp: Path, steps: int = 3, lr: float = 1e-2,
          extra: list[TrainerCallback] | None = None, device: str = "cpu") -> None:
    """A few optimizer steps through transformers' Trainer, wired the way l3m.train wires tuners
    (on CUDA with bf16 autocast, as l3m.train runs there)."""
    args = TrainingArguments(output_dir=str(tmp / "trainer"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, weight_decay=0.1, lr_scheduler_type="constant", report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             use_cpu=device == "cpu", bf16=device == "cuda",
                             seed=0, remove_unused_columns=False, max_grad_norm=1.0)
    groups = tuner.optimizer_param_groups(model, lr, 0.1)
    optimizers = (torch.optim.AdamW(groups, lr=lr), None) if groups is not None else (None, None)
    Trainer(model=model, args=args, train_dataset=make_examples(), data_collator=collate,
            callbacks=tuner.callbacks() + (extra or []), optimizers=optimizers).train()


def logits(model: nn.Module) -> torch.Tensor:
    batch = collate(make_examples(6, seed=9))
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device)).logits


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


# ----------------------------------------------------------------------- every tuner


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", registered_tuners())
def test_every_tuner_trains_exports_and_rebuilds(kind, device, base_dir, tmp_path):
    model = TinyMultiTask(base_dir).to(device)
    tuner = build_tuner(TunerSpec(kind=kind, reserve_p=0.3))
    model = tuner.prepare(model, fisher_batches())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tuner, tmp_path, device=device)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{kind}: nothing trained"

    sizes = tuner.export(model, tmp_path / "out")
    assert sizes["full_model_bytes"] > 0 and 0 < sizes["task_bytes"] <= sizes["full_model_bytes"]
    trained = logits(find_classifier(model))
    rebuilt = tuner.rebuild(base_dir, tmp_path / "out").to(device)
    assert torch.equal(logits(rebuilt), trained)
    if kind == "lora":  # compact only: merged weights would round differently from what was trained
        assert not list((tmp_path / "out").glob("model*.safetensors")) and sizes["adapter_bytes"] > 0
        return
    served = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").to(device)
    assert torch.equal(logits(served), trained)  # bit-exact, what serving loads


def test_registry_rejects_unknown_and_conflicting_kinds():
    with pytest.raises(KeyError, match="no tuner registered"):
        build_tuner(TunerSpec.model_construct(kind="nope"))
    with pytest.raises(ValueError, match="already registered"):
        register_tuner("full", type("Other", (Tuner,), {}))
    assert set(registered_tuners()) >= {"full", "child_f", "child_d", "weight_mask", "lora"}


def test_find_classifier_accepts_wrapper_bare_model_and_nesting(base_dir):
    model = TinyMultiTask(base_dir)
    assert find_classifier(model) is model.classifier_model
    assert find_classifier(model.classifier_model) is model.classifier_model
    holder = nn.ModuleDict({"inner": model.classifier_model})
    assert find_classifier(holder) is model.classifier_model
    with pytest.raises(TypeError):
        find_classifier(nn.Linear(2, 2))


# ----------------------------------------------------------------------- Child-Tuning_F


def test_child_f_zeroes_a_fraction_1_minus_p_and_rescales_the_rest():
    p = 0.3
    params = [nn.Parameter(torch.zeros(400, 250)), nn.Parameter(torch.zeros(50_000))]
    for q in params:
        q.grad = torch.randn_like(q)
    original = [q.grad.clone() for q in params]
    torch.manual_seed(0)
    ChildFCallback(params, p).on_pre_optimizer_step(None, None, None)
    for q, g in zip(params, original, strict=True):
        kept = q.grad != 0
        n = kept.numel()
        assert abs(kept.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)  # each tensor
        torch.testing.assert_close(q.grad[kept], g[kept] / p)  # survivors scaled by 1/p


def test_child_f_is_unbiased_and_fresh_each_step():
    p, draws = 0.25, 400
    q = nn.Parameter(torch.zeros(2000))
    g = torch.randn(2000)
    total, masks = torch.zeros(2000), []
    for _ in range(draws):
        q.grad = g.clone()
        ChildFCallback([q], p).on_pre_optimizer_step(None, None, None)
        total += q.grad
        masks.append(q.grad != 0)
    assert not torch.equal(masks[0], masks[1])
    # E[g * M / p] = g: the mean over draws converges (relative error ~ sqrt((1-p)/(p*draws)))
    assert (total / draws - g).abs().mean() < 0.15 * g.abs().mean()


def test_child_f_masks_the_gradients_the_trainer_steps_with(base_dir, tmp_path):
    """The classifier's gradients (embeddings, encoder, task head) are masked; the auxiliary MLM
    head's are not: it is no part of the network the authors tuned."""
    seen: list[tuple[float, float]] = []

    def zero_share(params) -> float:
        grads = [q.grad for q in params if q.grad is not None]
        return sum(int((g == 0).sum()) for g in grads) / sum(g.numel() for g in grads)

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            # The encoder's gradients have no zeros of their own (unused embedding rows do).
            clf = model.classifier_model
            seen.append((zero_share([*clf.bert.encoder.parameters(), *clf.classifier.parameters()]),
                         zero_share(model.mlm_head.parameters())))

    model = TinyMultiTask(base_dir)
    tuner = build_tuner(TunerSpec(kind="child_f", reserve_p=0.4))
    train(tuner.prepare(model), tuner, tmp_path, steps=2, extra=[Probe()])
    assert {id(p) for p in tuner._params} == {id(p) for p in model.classifier_model.parameters()}
    assert len(seen) == 2 and all(0.55 < clf < 0.65 for clf, _ in seen), seen
    assert all(mlm < 0.05 for _, mlm in seen), seen


# ----------------------------------------------------------------------- Child-Tuning_D


def test_select_child_keeps_the_global_top_fraction():
    fisher = [torch.arange(10.0), torch.arange(10.0, 30.0).reshape(4, 5)]
    masks, threshold = select_child(fisher, 0.2)  # top 6 of 30: values 24..29, all in tensor 2
    assert threshold == 24.0 and not masks[0].any()
    assert masks[1].sum() == 6 and masks[1].reshape(-1)[-6:].all()


def test_split_examples_trims_padding_without_changing_the_loss(base_dir):
    model = TinyMultiTask(base_dir).eval()
    batch = collate(make_examples(4, seed=3))
    units = list(split_examples(batch))
    assert [u["input_ids"].shape[1] for u in units] == batch["attention_mask"].sum(1).tolist()
    with torch.no_grad():
        for i, unit in enumerate(units):
            padded = {k: v[i : i + 1] for k, v in batch.items()}
            torch.testing.assert_close(model(**unit).loss, model(**padded).loss)


def test_split_examples_shares_a_separate_mlm_batch_among_the_examples(base_dir):
    """An MLM batch with its own rows (labelled texts + unlabelled-pool texts, l3m's collator
    with ``mlm_pool``): unit i gets MLM rows i and B+i, and trimming keeps every loss equal."""
    from l3m.modeling import build_multitask_model

    model = build_multitask_model(str(base_dir), ["a", "b", "c"], with_mlm=True).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # MLM runs in train mode only; without dropout the losses are comparable
    cls, pool = collate(make_examples(3, seed=3)), collate(make_examples(6, seed=4))
    batch = {"input_ids": cls["input_ids"], "attention_mask": cls["attention_mask"], "labels": cls["labels"],
             "mlm_input_ids": pool["input_ids"], "mlm_attention_mask": pool["attention_mask"],
             "mlm_labels": pool["mlm_labels"]}
    units = list(split_examples(batch))
    assert len(units) == 3
    for i, unit in enumerate(units):
        rows = torch.tensor([i, i + 3])
        assert torch.equal(unit["mlm_input_ids"], pool["input_ids"][rows][:, : unit["mlm_input_ids"].shape[1]])
        assert unit["mlm_input_ids"].shape[1] == int(pool["attention_mask"][rows].sum(1).max())
        padded = {k: (v[rows] if k.startswith("mlm_") else v[i : i + 1]) for k, v in batch.items()}
        with torch.no_grad():
            torch.testing.assert_close(model(**unit).loss, model(**padded).loss)
    layer = model.classifier_model.bert.encoder.layer[0].output.dense.weight
    (fisher,) = estimate_fisher(model, [layer], [batch])
    assert fisher.shape == layer.shape and fisher.sum() > 0


def test_fisher_is_the_mean_squared_per_example_gradient(base_dir):
    model = TinyMultiTask(base_dir)
    model.classifier_model.config.hidden_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    param = model.classifier_model.bert.encoder.layer[1].output.dense.weight
    batch = collate(make_examples(3, seed=4))
    expected = torch.zeros_like(param)
    for unit in split_examples(batch):
        model.zero_grad()
        model(**unit).loss.backward()
        expected += param.grad**2 / 3
    model.zero_grad()
    (fisher,) = estimate_fisher(model, [param], [batch])
    torch.testing.assert_close(fisher, expected)
    assert param.grad is None and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_child_d_never_changes_a_parameter_outside_the_child_network(base_dir, tmp_path, device):
    model = TinyMultiTask(base_dir).to(device)
    tuner = build_tuner(TunerSpec(kind="child_d", reserve_p=0.3))
    tuner.prepare(model, fisher_batches())
    masks = tuner.child_masks()
    assert masks and all("layer" in n for n in masks)
    assert not any("embeddings" in n or "classifier.weight" in n for n in masks)
    assert abs(tuner.child_fraction - 0.3) < 0.01
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tuner, tmp_path, steps=4, device=device)  # weight_decay 0.1: AdamW would shrink the rest
    for name, p in model.named_parameters():
        if name in masks:
            m = masks[name]
            assert torch.equal(p[~m], before[name][~m]), name  # bit-identical outside the child
            if m.any() and name.endswith("weight") and "LayerNorm" not in name:
                assert (p[m] != before[name][m]).float().mean() > 0.9, name  # the child trains
        elif "embeddings.word" in name or name.endswith("classifier.weight"):
            assert not torch.equal(p, before[name]), name  # outside the scope: normal updates


def test_child_d_requires_fisher_batches_and_a_matching_scope(base_dir):
    with pytest.raises(ValueError, match="fisher_batches"):
        build_tuner(TunerSpec(kind="child_d")).prepare(TinyMultiTask(base_dir), None)
    with pytest.raises(ValueError, match="scope"):
        build_tuner(TunerSpec(kind="child_d", scope="nowhere")).prepare(TinyMultiTask(base_dir), fisher_batches())


def test_child_d_masks_follow_the_parameters_to_the_trainer_device():
    """prepare() runs before the Trainer moves the model: the callback must follow it there.

    (Found on a GPU run: masks left on the CPU met CUDA gradients.) The ``meta`` device stands in
    for CUDA so the test runs everywhere.
    """
    from l3m.tuning.child_d import ChildDCallback

    p = torch.nn.Parameter(torch.randn(4, 3))
    cb = ChildDCallback([p], [torch.rand(4, 3) > 0.5])
    from types import SimpleNamespace

    cb.params = [SimpleNamespace(device=torch.device("meta"))]  # what model.to(device) does to p
    cb.on_train_begin(None, None, None)
    assert cb.masks[0].device.type == "meta"
    assert cb.frozen_out[0].device.type == "meta" and cb.frozen_values[0].device.type == "meta"
