"""The lora tuner (peft): what it adapts, what trains, what is stored, and its run identity.

The contract every tuner meets (train, export, rebuild bit-exact) is in test_tuning.py; the
per-family default target modules in test_family_tuning.py.
"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from test_training import _fake_logp, domain, tiny_model  # noqa: F401  (fixtures)
from test_tuning import TinyMultiTask, base_dir, train  # noqa: F401  (fixture)

from l3m.config import LORA_FIELDS, MaskingSpec, RunConfig, TunerSpec
from l3m.identity import run_identity, tuner_identity
from l3m.tuning import build_tuner, find_classifier
from l3m.tuning.lora import LORA_FILE
from l3m.tuning.trained import load_trained


def _adapted(model: torch.nn.Module) -> set[str]:
    return {n for n, m in find_classifier(model).named_modules() if isinstance(m, LoraLayer)}


def test_lora_adapts_query_and_value_of_every_layer_by_default(base_dir):  # noqa: F811
    model = build_tuner(TunerSpec(kind="lora")).prepare(TinyMultiTask(base_dir))
    assert _adapted(model) == {f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    assert len(adapters) == 8  # A and B of 4 linears
    # The rest of what trains is l3m's head: the classifier and the (MLM checkpoint's missing) pooler.
    assert trainable - adapters == {"classifier_model.classifier.weight", "classifier_model.classifier.bias",
                                    "classifier_model.bert.pooler.dense.weight", "classifier_model.bert.pooler.dense.bias"}
    frozen_only = build_tuner(TunerSpec(kind="lora", train_head=False)).prepare(TinyMultiTask(base_dir))
    assert all(".lora_" in n for n, p in frozen_only.named_parameters() if p.requires_grad)


def test_lora_target_modules_come_from_the_config_and_a_miss_is_a_clear_error(base_dir):  # noqa: F811
    model = build_tuner(TunerSpec(kind="lora", target_modules=["key", "intermediate.dense"])).prepare(TinyMultiTask(base_dir))
    assert _adapted(model) == {f"bert.encoder.layer.{i}.{m}" for i in (0, 1)
                               for m in ("attention.self.key", "intermediate.dense")}
    with pytest.raises(ValueError, match=r"no encoder-layer linear of bert matches target_modules \['nowhere'\]"):
        build_tuner(TunerSpec(kind="lora", target_modules=["nowhere"])).prepare(TinyMultiTask(base_dir))
    with pytest.raises(ValueError, match="target_modules"):
        TunerSpec(kind="lora", target_modules=[])


def test_lora_targets_a_family_cannot_meet_are_refused_before_the_run(tmp_path):
    """The same rule, checked with the model's capabilities (exit 2 on the CLI, no training)."""
    from l3m.capabilities import Capabilities, refusals

    caps = Capabilities("distilbert", None, None, None, None,
                        layer_linears=tuple(f"distilbert.transformer.layer.0.attention.{m}" for m in ("q_lin", "v_lin")))

    def why(**spec: object) -> list[str]:
        cfg = RunConfig(domain={"name": "d", "splits": {"train": {"path": "t.jsonl"}}}, model={"name_or_path": "x"},
                        strategies=[{"kind": "none"}], tuners=[{"kind": "full"}, {"kind": "lora", **spec}],
                        output_dir=str(tmp_path))
        return refusals(cfg, caps)

    assert why() == ["tuners[1] lora: peft has no default target modules for distilbert; set "
                     "tuners[].target_modules to names of its encoder-layer linears, e.g. ['q_lin', 'v_lin']"]
    assert why(target_modules=["query"]) == ["tuners[1] lora: no encoder-layer linear of distilbert matches "
                                             "target_modules ['query']; its linears end in ['q_lin', 'v_lin']"]
    assert why(target_modules=["q_lin", "v_lin"]) == []


def test_lora_trains_adapters_and_head_and_leaves_every_pretrained_weight(base_dir, tmp_path):  # noqa: F811
    model = TinyMultiTask(base_dir)
    tuner = build_tuner(TunerSpec(kind="lora", lora_lr=5e-2))
    model = tuner.prepare(model)
    groups = tuner.optimizer_param_groups(model, 1e-3, 0.1)
    assert groups is not None and groups[0]["lr"] == 5e-2 and len(groups[0]["params"]) == 8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tuner, tmp_path, steps=3)
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        if ".lora_B" in name or name.startswith("classifier_model.classifier."):
            assert moved, name  # B starts at zero: it moves at the first step
        elif ".lora_" not in name and "pooler" not in name:
            assert not moved, name  # embeddings, frozen linears, LayerNorms, the MLM head


def test_lora_export_is_compact_and_a_run_directory_loads_over_its_base(base_dir, tmp_path):  # noqa: F811
    import json

    model = TinyMultiTask(base_dir)
    tuner = build_tuner(TunerSpec(kind="lora", rank=4))
    model = tuner.prepare(model)
    train(model, tuner, tmp_path, steps=2)
    sizes = tuner.export(model, tmp_path / "out")
    assert (tmp_path / "out" / LORA_FILE).stat().st_size == sizes["task_bytes"] < sizes["full_model_bytes"] / 4
    assert sizes["adapter_bytes"] == 4 * 4 * 32 * 4 * 2  # (A: 4x32 + B: 32x4) fp32, on 4 linears
    # A run directory names its tuner and base in l3m.json; the library loader rebuilds it.
    (tmp_path / "out" / "l3m.json").write_text(json.dumps(
        {"tuner": TunerSpec(kind="lora", rank=4).model_dump(), "base_model": str(base_dir)}))
    clf = find_classifier(model).eval()
    batch = {"input_ids": torch.tensor([[5, 9, 11, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(load_trained(tmp_path / "out")(**batch).logits, clf(**batch).logits)


def test_lora_settings_are_in_lora_identities_only(tmp_path):
    cfg = RunConfig(domain={"name": "d", "splits": {"train": {"path": "t.jsonl"}}},
                    model={"name_or_path": "bert-base-uncased"}, output_dir=str(tmp_path))
    old_keys = {"kind", "reserve_p", "scope", "tau", "initial_sparsity", "train_head", "mask_lr"}
    for kind in ("full", "child_f", "child_d", "weight_mask"):
        # Exactly the fields these tuners' identities had before lora existed: their run ids stand.
        assert set(tuner_identity(TunerSpec(kind=kind))) == old_keys, kind
        assert tuner_identity(TunerSpec(kind=kind, rank=4, target_modules=["key"])) == tuner_identity(TunerSpec(kind=kind))
    assert set(tuner_identity(TunerSpec(kind="lora"))) == LORA_FIELDS
    assert tuner_identity(TunerSpec(kind="lora", mask_lr=0.5)) == tuner_identity(TunerSpec(kind="lora"))

    def ident(**spec: object) -> dict:
        # Not hashed here: a hub id has no local files, only the tuner part is compared.
        return run_identity(cfg, MaskingSpec(kind="l3"), TunerSpec(kind="lora", **spec), 1, "data", "s")["tuner"]

    variants = [{}, {"rank": 4}, {"alpha": 8}, {"dropout": 0.0}, {"target_modules": ["query"]}, {"lora_lr": 1e-3},
                {"train_head": False}]
    assert len({str(ident(**v)) for v in variants}) == len(variants)


@pytest.mark.slow
def test_lora_with_every_masking_strategy_through_the_experiment(domain, tiny_model, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    from transformers import AutoTokenizer

    from l3m import experiment, results
    from l3m import inputs as inputs_module

    request_domain, request_model = domain, tiny_model
    cfg = RunConfig(domain=request_domain, model={"name_or_path": str(request_model), "max_length": 32},
                    strategies=[{"kind": "none"}, {"kind": "random"}, {"kind": "l3"}, {"kind": "selective"}],
                    tuners=[{"kind": "lora", "rank": 4, "lora_lr": 1e-2}],
                    training={"epochs": 1, "batch_size": 16, "seeds": [1], "fp16_on_cuda": False},
                    output_dir=str(tmp_path / "out"))
    tok = AutoTokenizer.from_pretrained(request_model)
    monkeypatch.setattr(inputs_module, "score_train", lambda cfg, loaded: (_fake_logp(loaded, tok), "fake-key"))
    out = experiment.run_experiment(cfg, log=lambda s: None)
    keys = [k for k, _ in experiment.plan_runs(cfg, experiment.load_domain(request_domain).fingerprint)]
    rows = results.summarize([k.path(tmp_path / "out") for k in keys])
    assert {(r["strategy"], r["tuner"]) for r in rows} == {(s, "lora") for s in ("none", "random", "l3", "selective")}
    assert "| lora |" in out["md"].read_text()
    # The Selective rater is the lora STL run: rebuilt over its base to rate the tokens.
    assert list((tmp_path / "out" / "selective").glob("selective-*.npz"))
    for key in keys:
        model_dir = key.path(tmp_path / "out") / "model"
        assert (model_dir / LORA_FILE).is_file() and not list(model_dir.glob("model*.safetensors"))
