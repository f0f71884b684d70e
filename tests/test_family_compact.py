"""Compact domains (weight_mask, lora) on every encoder family (tests/families.py): trained a few
steps, exported as the domain file, rebuilt over the base exactly, then loaded as the multi-domain
service loads a store entry (``serving.domains.load_served``: the base resident once, each
weight_mask linear the base's weight times a boolean mask) with the same logits and every
tensor equal to the base's shared with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import EDGE_FAMILIES, FAMILIES, build
from test_family_tuning import LORA_QV
from transformers import AutoTokenizer

from l3m import basefiles
from l3m.config import TunerSpec
from l3m.modeling import build_multitask_model
from l3m.tuning import build_tuner
from l3m.tuning.base import find_classifier
from l3m.tuning.compact import read_meta as read_domain_meta
from l3m.tuning.weight_mask import MASK_FILE
from serving.bases import BaseRef, copy_model_dir
from serving.domains import BasePool, SharedMaskedLinear, load_served
from serving.model_io import read_meta

LABELS = ["a", "b", "c"]
TEXTS = ["we extend the method of prior work to proteins", "results differ from theirs", "a third, longer text"]
KINDS = ("weight_mask", "lora")

# The edge families' attention query and value linears (lora names them: peft has no default), and
# a weight_mask scope for those whose layer-stack linears do not contain the default "layer" (XLM
# ``transformer.attentions.0.q_lin``, Funnel ``funnel.encoder.blocks.0.0.attention.q_head``):
# without it the tuner is refused up front (``l3m.capabilities``), which is a config choice, not
# a family the tuner cannot handle.
EDGE_LORA_QV = {
    "deberta-v2-lm": ("attention.self.query_proj", "attention.self.value_proj"),
    "xlm-roberta-nosplit": ("attention.self.query", "attention.self.value"),
    "xlm": ("q_lin", "v_lin"),
    "funnel": ("attention.q_head", "attention.v_head"),
}
EDGE_SCOPE = {"xlm": "transformer.", "funnel": "encoder.blocks."}
ALL = [*FAMILIES, *EDGE_FAMILIES]


@pytest.fixture(scope="module")
def edge_models(tmp_path_factory, shared_data: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edges")
    return {name: build(name, root / name, shared_data) for name in EDGE_FAMILIES}


def _spec(kind: str, family: str) -> TunerSpec:
    if kind == "lora":
        qv = LORA_QV.get(family) or EDGE_LORA_QV[family]
        return TunerSpec(kind="lora", target_modules=[n.rsplit(".", 1)[-1] for n in qv])
    # A large mask lr: a few steps flip masks (initial_sparsity already masks 5% at the start).
    return TunerSpec(kind="weight_mask", mask_lr=0.5, scope=EDGE_SCOPE.get(family, "layer"))


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def _store_entry(out: Path, entry: Path, base: Path, kind: str, tok: object) -> BaseRef:
    """``out`` as the registry stores a compact domain: its l3m.json, no merged weights, base.json."""
    tok.save_pretrained(out)  # type: ignore[attr-defined]
    meta = {"domain": f"toy_{kind}", "label_names": LABELS, "metrics": {"dev": {"macro_f1": 0.5}},
            "base_model": str(base), "max_length": 32, "strategy": "none", "tuner": {"kind": kind},
            "config": {"model": {"name_or_path": str(base)}}}  # fmt: skip
    (out / "l3m.json").write_text(json.dumps(meta))
    files = basefiles.base_files(base)
    ref = BaseRef("l3m_base:toy", basefiles.files_digest(files), str(base), [f.name for f in files])
    entry.mkdir()
    copy_model_dir(out, entry, ref, read_meta(out))
    return ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ALL)
def test_a_compact_domain_rebuilds_and_serves_over_a_shared_base(family, kind, family_models, edge_models,
                                                                  tmp_path):
    base = family_models.get(family) or edge_models[family]
    tok = AutoTokenizer.from_pretrained(base)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    torch.manual_seed(0)
    model = build_multitask_model(str(base), LABELS, with_mlm=False)
    tuner = build_tuner(_spec(kind, family))
    model = tuner.prepare(model)
    groups = tuner.optimizer_param_groups(model, 1e-2, 0.0)
    assert groups is not None
    opt = torch.optim.Adam([{**g, "lr": g.get("lr", 1e-2)} for g in groups], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    for step in range(3):
        out = model(**batch, labels=torch.tensor([step % 3, (step + 1) % 3, (step + 2) % 3]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    tuned = ".scores" if kind == "weight_mask" else ".lora_B"
    assert any(tuned in n for n in changed) and any(tuned not in n for n in changed), sorted(changed)

    clf = find_classifier(model)
    trained = _logits(clf, batch)
    tuner.export(model, tmp_path / "out")
    rebuilt = tuner.rebuild(base, tmp_path / "out")
    torch.testing.assert_close(_logits(rebuilt, batch), trained, rtol=0, atol=1e-5)

    # As the multi-domain service loads a store entry: over the base's one resident copy.
    ref = _store_entry(tmp_path / "out", tmp_path / "entry", base, kind, tok)
    pool = BasePool(lambda tag: base if tag == ref.tag else tmp_path / "nowhere")
    served = load_served("toy:1", tmp_path / "entry", pool)
    if kind == "weight_mask":  # every masked linear is the base's weight (or a stored extra) times a mask
        views = {n for n, m in served.model.named_modules() if isinstance(m, SharedMaskedLinear)}
        assert views == set(read_domain_meta(tmp_path / "entry" / MASK_FILE)["shapes"]) and views, family
    torch.testing.assert_close(_logits(served.model, batch), _logits(rebuilt, batch), rtol=0, atol=1e-5)
    shared = pool.tensors(ref, tmp_path / "entry")
    pooled = {t.data_ptr() for t in shared.values()}
    for name, t in [*served.model.named_parameters(remove_duplicate=False),
                    *served.model.named_buffers(remove_duplicate=False)]:  # fmt: skip
        plain = name.replace(".base_layer.", ".")
        same = shared.get(plain)
        if same is not None and same.shape == t.shape and same.dtype == t.dtype and torch.equal(same, t):
            assert t.data_ptr() in pooled, f"{family} {kind}: {name} equals the base's but is a copy"
    # A served domain owns its head, what the base checkpoint lacks, and its adapters (lora) or
    # one byte per masked weight (weight_mask: a quarter of the float32 weights it masks).
    bound = 4 if kind == "lora" else 2
    assert served.owned_bytes < pool.bytes() / bound, (family, kind, served.owned_bytes, pool.bytes())
