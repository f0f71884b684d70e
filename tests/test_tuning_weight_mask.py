"""Learned binary weight masks (Zhao et al. 2020): frozen weights, STE, bit-packed storage, exact rebuild."""

from __future__ import annotations

import math

import pytest
import torch
from test_tuning import DEVICES, TinyMultiTask, logits, save_tiny_base, train
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from l3m.config import TunerSpec
from l3m.tuning import MaskedLinear, build_tuner, pack_mask, unpack_mask
from l3m.tuning.weight_mask import MASK_FILE, masked_modules


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.mark.parametrize("shape", [(8,), (3, 5), (7, 11, 3), (1,), (64, 33)])
def test_pack_unpack_roundtrip(shape):
    mask = torch.rand(shape) < 0.7
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_unpack_rejects_a_wrong_shape_and_pack_a_non_bool():
    with pytest.raises(ValueError):
        unpack_mask(pack_mask(torch.ones(16, dtype=torch.bool)), (3, 7))
    with pytest.raises(TypeError):
        pack_mask(torch.ones(4))


def test_masked_linear_forward_and_straight_through_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(300, 200)
    m = MaskedLinear(lin, tau=0.01, initial_sparsity=0.05)
    assert abs((~m.mask()).float().mean().item() - 0.05) < 0.005  # the authors' U(-a, b) init
    x = torch.randn(4, 300)
    out = m(x)
    w_eff = lin.weight * m.mask().float()
    torch.testing.assert_close(out, nn.functional.linear(x, w_eff, lin.bias))
    out.pow(2).sum().backward()
    # STE: dL/ds = dL/dM = W * dL/dW_eff, and no gradient reaches the frozen weight
    w = w_eff.detach().requires_grad_(True)
    nn.functional.linear(x, w, lin.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(m.scores.grad, lin.weight.detach() * w.grad)
    assert lin.weight.grad is None and not lin.weight.requires_grad
    assert MaskedLinear(nn.Linear(30, 30), 0.01, initial_sparsity=0.0).mask().all()  # nothing masked


def test_prepare_freezes_pretrained_weights_and_groups_scores_and_head(base_dir):
    model = TinyMultiTask(base_dir)
    tuner = build_tuner(TunerSpec(kind="weight_mask", mask_lr=1e-3))
    tuner.prepare(model)
    masked = masked_modules(model.classifier_model)
    # 6 linears per block (Q, K, V, attention out, intermediate, output) x 2 blocks + pooler
    assert len(masked) == 13 and "bert.pooler.dense" in masked
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"classifier_model.{n}.scores" for n in masked} | {
        "classifier_model.classifier.weight", "classifier_model.classifier.bias"}
    groups = tuner.optimizer_param_groups(model, 5e-5, 0.01)
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 13
    assert {g["lr"] for g in groups[1:]} == {5e-5}
    assert sum(len(g["params"]) for g in groups) == len(trainable)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train_head", [True, False])
def test_training_leaves_pretrained_weights_bit_identical_and_rebuilds_exactly(base_dir, tmp_path, train_head,
                                                                               device):
    model = TinyMultiTask(base_dir).to(device)
    tuner = build_tuner(TunerSpec(kind="weight_mask", mask_lr=0.05, train_head=train_head))
    tuner.prepare(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head = model.classifier_model.classifier.weight.detach().clone()
    masks0 = {n: m.mask().clone() for n, m in masked_modules(model).items()}
    train(model, tuner, tmp_path, steps=4, lr=1e-2, device=device)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    flipped = sum(int((m.mask() != masks0[n]).sum()) for n, m in masked_modules(model).items())
    assert flipped > 0  # the masks did learn, so the rebuild below is not of the initial mask
    assert torch.equal(model.classifier_model.classifier.weight, head) != train_head

    sizes = tuner.export(model, tmp_path / "out")
    masked = masked_modules(model.classifier_model)
    assert sizes["mask_bytes"] == sum(math.ceil(m.weight.numel() / 8) for m in masked.values())
    # Stored: what a fresh load of the base cannot reproduce. A frozen head keeps its zero-init
    # bias (reproducible), and the tiny MLM base, like the real one, has no pooler: the pooler's
    # random weight is stored, its zero bias is not.
    clf = model.classifier_model
    assert sizes["head_bytes"] == (clf.classifier.weight.numel() + train_head * clf.classifier.bias.numel()) * 4
    assert sizes["extra_bytes"] == clf.bert.pooler.dense.weight.numel() * 4
    assert sizes["task_bytes"] == (tmp_path / "out" / MASK_FILE).stat().st_size < sizes["full_model_bytes"]

    trained = logits(model.classifier_model)
    rebuilt = tuner.rebuild(base_dir, tmp_path / "out").to(device)
    assert torch.equal(logits(rebuilt), trained)
    served = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").to(device)
    assert torch.equal(logits(served), trained)
    assert not any(isinstance(m, MaskedLinear) for m in served.modules())


def test_export_does_not_disturb_the_global_rng(base_dir, tmp_path):
    model = TinyMultiTask(base_dir)
    tuner = build_tuner(TunerSpec(kind="weight_mask"))
    tuner.prepare(model)
    torch.manual_seed(123)
    tuner.export(model, tmp_path / "out")
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_real_model_mask_is_a_small_fraction_of_the_full_model(shared_model, tmp_path):
    """minilm-l6-mlm: export sizes and an exact rebuild of the real classifier."""
    clf = AutoModelForSequenceClassification.from_pretrained(shared_model, num_labels=5)
    tuner = build_tuner(TunerSpec(kind="weight_mask"))
    tuner.prepare(clf)
    sizes = tuner.export(clf, tmp_path / "out")
    assert sizes["mask_bytes"] * 25 < sizes["full_model_bytes"]
    assert sizes["task_bytes"] * 10 < sizes["full_model_bytes"]
    tok = AutoTokenizer.from_pretrained(shared_model)
    enc = tok(["a citation that extends prior work", "we use the method of"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = clf.eval()(**enc).logits
        got = tuner.rebuild(shared_model, tmp_path / "out")(**enc).logits
    assert torch.equal(got, want)
