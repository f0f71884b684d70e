"""The authors' training recipe pieces: optimiser groups, the authors' head, stage 2."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoTokenizer

from l3m.config import ConfigError, MaskingSpec, RunConfig, TrainingSpec, TunerSpec, load_config
from l3m.data.loading import load_domain
from l3m.modeling import build_multitask_model
from l3m.optim import apply_head, head_param_names, param_groups
from l3m.train import TrainInputs, train_one
from tests.test_training import _fake_logp, domain  # noqa: F401  (fixture)


def _model(tiny_mlm_dir, with_mlm=True):
    return build_multitask_model(str(tiny_mlm_dir), ["neg", "pos"], with_mlm=with_mlm)


def test_param_groups_carry_the_configured_lrs(tiny_mlm_dir):
    model = _model(tiny_mlm_dir)
    t = TrainingSpec(lr=1e-4, weight_decay=0.01, head_lr=1e-3, head_weight_decay=0.1)
    groups = param_groups(model, t)
    names = {id(p): n for n, p in model.named_parameters()}
    head = head_param_names(model)
    assert any("classifier.weight" in n for n in head) and any("pooler.dense.weight" in n for n in head)
    assert not any("encoder.layer" in n or "mlm_model" in n for n in head)
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            assert g["lr"] == (1e-3 if n in head else 1e-4), n
            no_decay = "bias" in n or "LayerNorm" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.1 if n in head else 0.01), n
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    # Unset head settings fall back to the encoder's.
    flat = param_groups(model, TrainingSpec(lr=2e-5))
    assert {g["lr"] for g in flat} == {2e-5}


def test_head_bias_decay_decays_the_heads_biases_as_the_authors(tiny_mlm_dir, domain):  # noqa: F811
    """The authors' head AdamW (classf_wd 0.1) has no no-decay group: the paper profiles decay
    the head's biases too; the body's biases and LayerNorm stay undecayed."""
    from l3m.identity import run_identity

    model = _model(tiny_mlm_dir)
    t = TrainingSpec(lr=1e-4, weight_decay=0.01, head_lr=1e-3, head_weight_decay=0.1, head_bias_decay=True)
    names = {id(p): n for n, p in model.named_parameters()}
    head = head_param_names(model)
    decay = {names[id(p)]: g["weight_decay"] for g in param_groups(model, t) for p in g["params"]}
    assert {decay[n] for n in head} == {0.1} and "classifier_model.bert.pooler.dense.bias" in head
    assert {v for n, v in decay.items() if n not in head and ("bias" in n or "LayerNorm" in n)} == {0.0}
    for name in ("chemprot-roberta", "chemprot-minilm", "citation_intent-roberta", "citation_intent-minilm"):
        assert load_config(f"configs/paper/{name}.yaml").training.head_bias_decay, name
    # A new setting: part of the identity when set, absent at its default (older runs keep theirs).
    cfg = RunConfig(domain=domain)
    ident = run_identity(cfg, MaskingSpec(kind="none"), TunerSpec(), 1, "fp", None)
    assert "head_bias_decay" not in ident["training"]
    on = cfg.model_copy(update={"training": cfg.training.model_copy(update={"head_bias_decay": True})})
    assert run_identity(on, MaskingSpec(kind="none"), TunerSpec(), 1, "fp", None)["training"]["head_bias_decay"]


def test_tuner_groups_with_their_own_lr_are_kept(tiny_mlm_dir):
    model = _model(tiny_mlm_dir, with_mlm=False)
    extra = torch.nn.Parameter(torch.zeros(3))
    params = [p for p in model.parameters()]
    groups = param_groups(model, TrainingSpec(lr=1e-4, head_lr=1e-3),
                          [{"params": [extra], "lr": 5e-2, "weight_decay": 0.0}, {"params": params, "lr": 1e-4}])
    assert groups[0]["params"] == [extra] and groups[0]["lr"] == 5e-2
    assert {g["lr"] for g in groups[1:]} == {1e-4, 1e-3}


def test_authors_head_adds_cls_dropout_in_training_only(tiny_mlm_dir):
    torch.manual_seed(0)
    model = _model(tiny_mlm_dir, with_mlm=False)
    clf = model.classifier_model
    ids = torch.tensor([[101, 2204, 2143, 102]])
    clf.train()
    base_train = [clf(input_ids=ids).logits for _ in range(3)]
    apply_head(model, "authors")
    clf.eval()
    a, b = clf(input_ids=ids).logits, clf(input_ids=ids).logits
    assert torch.equal(a, b)  # inference: deterministic, the hook is inert
    # Training: the dropout on the pooler's input makes the head see different CLS vectors.
    clf.bert.encoder.eval()  # isolate the head's dropout from the encoder's
    clf.dropout.eval()
    clf.bert.pooler.train()
    outs = {tuple(clf(input_ids=ids).logits.flatten().tolist()) for _ in range(4)}
    assert len(outs) > 1 and base_train  # noqa: PT018


def test_stage2_needs_the_full_tuner(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("domain: {name: d, splits: {train: {path: t.jsonl}}}\n"
                   "tuners: [{kind: full}, {kind: child_f}]\ntraining: {stage2: {epochs: 2}}\n")
    with pytest.raises(ConfigError, match="stage2 runs with the full tuner only"):
        load_config(cfg)


def test_stage2_starts_from_stage1_best_and_trains_no_mlm(domain, tiny_mlm_dir, tmp_path, monkeypatch):  # noqa: F811
    import l3m.stage2 as stage2

    cfg = RunConfig(domain=domain, model={"name_or_path": str(tiny_mlm_dir), "max_length": 32, "head": "authors"},
                    training={"epochs": 2, "batch_size": 8, "lr": 1e-3, "head_lr": 3e-3, "fp16_on_cuda": False,
                              "mlm_batch": "independent",
                              "stage2": {"epochs": 2, "lr": 1e-4, "patience": 2}},
                    output_dir=str(tmp_path))
    tok = AutoTokenizer.from_pretrained(tiny_mlm_dir)
    loaded = load_domain(domain)
    inputs = TrainInputs(loaded, token_logp=_fake_logp(loaded, tok), score_key="fake")
    seen = {}
    real = stage2.run_stage2

    def spy(stage1_model, *args, **kwargs):
        seen["stage1_state"] = {k: v.clone() for k, v in stage1_model.classifier_model.state_dict().items()}
        trainer, best = real(stage1_model, *args, **kwargs)
        seen["mlm"] = trainer.model.mlm_model
        seen["first_batch"] = next(iter(trainer.get_train_dataloader()))
        return trainer, best

    monkeypatch.setattr("l3m.run_steps.run_stage2", spy)

    rec = train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), seed=3, inputs=inputs, out_dir=tmp_path / "run",
                    keep_checkpoints=True)
    assert seen["mlm"] is None and "mlm_input_ids" not in seen["first_batch"]
    st = rec.stages
    assert st["stage1"]["global_steps"] == 12 and 0 < st["stage2"]["global_steps"] <= 12
    assert st["kept"] in ("stage1", "stage2")
    # The run's reported metrics are the kept stage's.
    assert rec.metrics == st[st["kept"]]["metrics"]
    # Stage 2 began at the stage-1 best checkpoint's weights.
    best = safetensors.torch.load_file(f"{st['stage1']['best_checkpoint']}/model.safetensors")
    for name, value in seen["stage1_state"].items():
        if f"classifier_model.{name}" in best:
            assert torch.equal(best[f"classifier_model.{name}"], value), name
    assert rec.train_rows == 48
    meta = json.loads((tmp_path / "run" / "model" / "l3m.json").read_text())
    assert meta["stages"]["kept"] == st["kept"]


def test_stage2_checkpoints_are_removed(domain, tiny_mlm_dir, tmp_path):  # noqa: F811
    cfg = RunConfig(domain=domain, model={"name_or_path": str(tiny_mlm_dir), "max_length": 32},
                    training={"epochs": 1, "batch_size": 16, "lr": 1e-3, "fp16_on_cuda": False,
                              "stage2": {"epochs": 1, "lr": 1e-4}}, output_dir=str(tmp_path))
    rec = train_one(cfg, MaskingSpec(kind="none"), TunerSpec(), seed=1, inputs=TrainInputs(load_domain(domain)),
                    out_dir=tmp_path / "run")
    assert set(rec.stages) == {"stage1", "stage2", "kept"}
    assert not (tmp_path / "run" / "stage2").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_gradient_accumulation_averages_micro_batches(domain, tiny_mlm_dir, tmp_path):  # noqa: F811
    """With grad_accum=2 the Trainer must divide each micro-batch loss by 2 (the model does not
    scale its own loss), so an accumulated step has the gradient of the mean loss."""
    from transformers import TrainingArguments

    from l3m.trainer import MultiTaskTrainer

    model = _model(tiny_mlm_dir, with_mlm=False)
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[], use_cpu=True)
    trainer = MultiTaskTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 2
    batch = {"input_ids": torch.tensor([[101, 2204, 102]]), "labels": torch.tensor([1])}
    for m in model.modules():  # no dropout: the two forward passes must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    full = model(**batch).loss.item()
    # The Trainer loop passes the batch's label count; a model that "accepts loss kwargs" would use it.
    step = trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(2)).item()
    assert step == pytest.approx(full / 2, rel=1e-5)
