"""Loss weightings: fixed lambda is the model's own loss; META-TARTAN learns the task weights."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from test_identity import _ids
from test_training import domain, tiny_model  # noqa: F401  (fixtures)
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from l3m.config import MaskingSpec, RunConfig, TunerSpec, WeightingSpec
from l3m.data.loading import load_domain
from l3m.modeling import build_multitask_model
from l3m.train import TrainInputs, train_one
from l3m.weighting import build_weighting, registered_weightings
from l3m.weighting.meta_tartan import MetaTartan, body_parameters, cosine
from l3m.weighting.report import WEIGHTS_LOG, WEIGHTS_PLOT

META = WeightingSpec(kind="meta_tartan")


def test_registry_lists_the_kinds_and_refuses_unknown():
    assert registered_weightings() == ["fixed", "meta_tartan"]
    assert not build_weighting(WeightingSpec(), 0.5, 1).needs_task_grads
    assert build_weighting(META, 0.5, 1).needs_task_grads
    with pytest.raises(KeyError, match="no loss weighting registered for kind 'other'"):
        build_weighting(WeightingSpec.model_construct(kind="other"), 0.5, 1)


def test_fixed_reproduces_cls_plus_lambda_mlm(tiny_model):  # noqa: F811
    model = build_multitask_model(str(tiny_model), ["neg", "pos"], with_mlm=True, mlm_weight=0.3).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 12), generator=g)
    mlm_labels = torch.where(torch.rand(4, 12, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1]),
             "mlm_input_ids": ids, "mlm_labels": mlm_labels}
    torch.manual_seed(1)  # the same dropout draws in both passes
    loss = model(**batch).loss
    torch.manual_seed(1)
    losses, _ = model.task_losses(**batch)
    fixed = build_weighting(WeightingSpec(), 0.3, seed=1)
    assert fixed.weights() == {"cls": 1.0, "mlm": 0.3}
    assert torch.equal(fixed.combine(losses), loss)
    assert torch.equal(loss, losses["cls"] + 0.3 * losses["mlm"])


class ToyMultiTask(nn.Module):
    """A tiny BERT classifier whose task losses are linear in the encoder weights: the cls loss
    descends along ``direction`` (the dev gradient below), the MLM loss against it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=16, num_labels=2)
        self.classifier_model = BertForSequenceClassification(cfg)
        self.direction = [torch.randn_like(p) for p in body_parameters(self)]

    def task_losses(self, **_: object) -> tuple[dict[str, torch.Tensor], None]:
        body = body_parameters(self)
        along = sum((p * d).sum() for p, d in zip(body, self.direction, strict=True))
        head = self.classifier_model.classifier.weight.sum()
        return {"cls": along + head, "mlm": -2.0 * along}, None


class FixedDevGradient(MetaTartan):
    """META-TARTAN with a known dev gradient (the toy's direction) in place of the dev head."""

    direction: list[torch.Tensor]

    def dev_gradient(self, encoder, body, num_labels, ctx):  # noqa: ANN001, ANN201
        return self.direction


def test_meta_tartan_moves_weight_toward_the_task_agreeing_with_dev():
    model = ToyMultiTask()
    meta = FixedDevGradient(WeightingSpec(kind="meta_tartan", meta_lr=0.5), mlm_weight=1.0, seed=1)
    meta.direction = model.direction
    assert meta.weights() == {"cls": 0.5, "mlm": 0.5}
    previous = 0.5
    for step in range(1, 4):
        for _ in range(2):  # two micro-batches per optimizer step
            meta.accumulate(model, {}, accum=2, ctx=nullcontext)
        # p.grad = sum_t w_t g_t / accum over the two micro-batches: (w_cls - 2 w_mlm) * direction.
        w = meta.weights()
        body = body_parameters(model)
        assert torch.allclose(body[0].grad, (w["cls"] - 2 * w["mlm"]) * model.direction[0], atol=1e-6)
        model.zero_grad()
        meta.update(step)
        row = meta.log[-1]
        assert row["cos_cls"] == pytest.approx(1.0) and row["cos_mlm"] == pytest.approx(-1.0)
        assert meta.weights()["cls"] > previous  # toward cls, away from mlm
        previous = meta.weights()["cls"]
    # One step: logits move by meta_lr * cos (grad -cos/accum summed over accum micro-batches).
    assert meta.logits.tolist() == pytest.approx([1.5, -1.5])
    assert [r["step"] for r in meta.log] == [1, 2, 3] and meta.log[0]["weight_cls"] == 0.5


def test_meta_tartan_body_is_the_encoder_without_the_heads_pooler(tiny_model):  # noqa: F811
    """BERT's pooler is the authors' head's dense+tanh (re-initialised, l3m.optim): outside the
    body, so every body parameter has a dev gradient and the cosine has no cls-only part."""
    from l3m.optim import apply_head

    model = build_multitask_model(str(tiny_model), ["neg", "pos"], with_mlm=True, mlm_weight=1.0)
    apply_head(model, "authors")
    encoder = model.classifier_model.base_model
    names = {id(p): n for n, p in encoder.named_parameters()}
    body = body_parameters(model)
    assert {names[id(p)].split(".")[0] for p in body} == {"embeddings", "encoder"}
    assert {n for n in names.values() if n.startswith("pooler.")} == {"pooler.dense.weight", "pooler.dense.bias"}
    assert len(body) == len(names) - 2
    meta = MetaTartan(WeightingSpec(kind="meta_tartan", head_iters=2), 1.0, seed=1)
    meta.prepare(_dev_rows(8), _collate)
    grads = meta.dev_gradient(encoder, body, 2, nullcontext)
    assert all(g is not None for g in grads)


def test_cosine_of_a_zero_gradient_is_zero():
    a = [torch.tensor([1.0, 2.0]), None]
    assert cosine(a, [torch.tensor([2.0, 4.0]), None]) == pytest.approx(1.0)
    # As the authors' calc_norm / dot_prod: a part only one side has counts in that side's norm.
    assert cosine(a, [torch.tensor([2.0, 4.0]), torch.tensor([3.0])]) == pytest.approx(10 / (5**0.5 * 29**0.5))
    assert cosine(a, [torch.zeros(2), None]) == 0.0


def _dev_rows(n: int) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(5, 30, (6,), generator=g).tolist(), "label": i % 2} for i in range(n)]


def _collate(rows: list[dict[str, object]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([r["label"] for r in rows])}


def test_dev_rows_are_reproducible_from_the_seed_and_state_resumes():
    a, b, c = (MetaTartan(META, 1.0, seed=s) for s in (7, 7, 8))
    for m in (a, b, c):
        m.prepare(_dev_rows(100), _collate)
    first = a._dev_batch(32, torch.device("cpu"))["input_ids"]
    assert torch.equal(first, b._dev_batch(32, torch.device("cpu"))["input_ids"])
    assert not torch.equal(first, c._dev_batch(32, torch.device("cpu"))["input_ids"])
    a.logit_grad += torch.tensor([-1.0, 1.0])
    a.update(1)
    resumed = MetaTartan(META, 1.0, seed=99)
    resumed.prepare(_dev_rows(100), _collate)
    resumed.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert resumed.weights() == a.weights() and resumed.log == a.log
    assert torch.equal(resumed._dev_batch(8, torch.device("cpu"))["input_ids"],
                       a._dev_batch(8, torch.device("cpu"))["input_ids"])


def test_dev_head_fits_the_dev_rows_with_the_encoder_frozen():
    model = ToyMultiTask()
    encoder = model.classifier_model.base_model
    before = [p.detach().clone() for p in encoder.parameters()]
    meta = MetaTartan(WeightingSpec(kind="meta_tartan", head_iters=10, head_tol=0.0), 1.0, seed=1)
    meta.prepare(_dev_rows(40), _collate)
    grads = meta.dev_gradient(encoder, list(encoder.parameters()), 2, nullcontext)
    assert meta._step["head_iters"] == 10 and meta._step["head_loss"] is not None
    assert all(torch.equal(p, q) for p, q in zip(before, encoder.parameters(), strict=True))
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in meta.head.parameters())  # the head is frozen once fitted


def test_meta_tartan_refuses_several_processes(monkeypatch):
    import l3m.weighting.meta_tartan as mt

    monkeypatch.setattr(mt.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mt.dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="one process only.*2 ranks"):
        MetaTartan(META, 1.0, seed=1).prepare(_dev_rows(4), _collate)


def test_weighting_is_mlm_run_identity_not_stl(domain, tiny_model, tmp_path):  # noqa: F811
    def cfg(**weighting: object) -> RunConfig:
        return RunConfig(domain=domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                         strategies=[{"kind": "none"}, {"kind": "l3"}, {"kind": "random"}],
                         training={"seeds": [1], "fp16_on_cuda": False}, weighting=weighting, output_dir=str(tmp_path))

    base = _ids(cfg())
    # A fixed run's meta settings are never read: its identity stays as before weightings existed.
    assert _ids(cfg(meta_lr=0.5)) == base
    meta = _ids(cfg(kind="meta_tartan"))
    meta_lr = _ids(cfg(kind="meta_tartan", meta_lr=0.5))
    for mlm in ("l3", "random"):
        assert len({base[(mlm, 1)], meta[(mlm, 1)], meta_lr[(mlm, 1)]}) == 3
    assert base[("none", 1)] == meta[("none", 1)] == meta_lr[("none", 1)]


@pytest.mark.parametrize("mlm_batch", ["same", pytest.param("independent", marks=pytest.mark.slow)])
def test_train_one_with_meta_tartan_logs_the_weights(domain, shared_model, tmp_path, mlm_batch):  # noqa: F811
    cfg = RunConfig(domain=domain, model={"name_or_path": str(shared_model), "max_length": 32},
                    training={"batch_size": 4, "grad_accum": 2, "max_steps": 3, "train_limit": 24, "lr": 1e-4,
                              "fp16_on_cuda": False, "mlm_batch": mlm_batch},
                    weighting={"kind": "meta_tartan", "dev_samples": 8, "dev_batch_size": 8},
                    output_dir=str(tmp_path))
    rec = train_one(cfg, MaskingSpec(kind="random"), TunerSpec(), seed=3, inputs=TrainInputs(load_domain(domain)),
                    out_dir=tmp_path / "run")
    assert rec.global_steps == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / WEIGHTS_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["weight_cls"] + r["weight_mlm"] == pytest.approx(1.0)
        assert -1 <= r["cos_cls"] <= 1 and -1 <= r["cos_mlm"] <= 1 and 1 <= r["dev_head_iters"] <= 10
    assert rows[0]["weight_cls"] == 0.5 and rows[1]["weight_cls"] != 0.5  # the weights are learned
    assert (tmp_path / "run" / WEIGHTS_PLOT).stat().st_size > 0
    assert WEIGHTS_PLOT in (tmp_path / "run" / "report.md").read_text()


def test_checkpoint_keeps_the_weights_for_a_resumed_run(tmp_path):
    from types import SimpleNamespace

    from l3m.weighting.meta_tartan import STATE_FILE, MetaTartanCallback

    meta = MetaTartan(META, 1.0, seed=1)
    meta.logit_grad += torch.tensor([-2.0, 2.0])
    meta.update(4)
    (tmp_path / "checkpoint-4").mkdir()
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=4)
    MetaTartanCallback(meta).on_save(args, state, None)
    assert (tmp_path / "checkpoint-4" / STATE_FILE).exists()
    resumed = MetaTartan(META, 1.0, seed=1)
    MetaTartanCallback(resumed).on_train_begin(args, state, None)
    assert resumed.weights() == meta.weights() != {"cls": 0.5, "mlm": 0.5} and resumed.log == meta.log
    fresh = MetaTartan(META, 1.0, seed=1)  # a run starting from step 0 keeps its equal start
    MetaTartanCallback(fresh).on_train_begin(args, SimpleNamespace(global_step=0), None)
    assert fresh.weights() == {"cls": 0.5, "mlm": 0.5} and fresh.log == []
