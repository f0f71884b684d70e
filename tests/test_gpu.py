"""Tests that need a CUDA GPU (marker ``gpu``): they skip without one.

``bench/gpu_check.sh`` runs them on the lent GPU (``pytest tests/test_gpu.py -m gpu``). The GPU
machine has torch, transformers, numpy and scipy but no Prefect, BentoML or Great Expectations,
so this module imports only the scoring engine, the multi-task model and serving's forward path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FIXTURE = Path(__file__).parent / "fixtures" / "minicons_citation_intent.json"
LABELS = ["background", "method", "result"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(json.loads(FIXTURE.read_text())["texts"])


@pytest.fixture(scope="module")
def cpu_exact(shared_model: Path, texts: list[str]) -> np.ndarray:
    from l3m.scoring import PLLScorer

    scorer = PLLScorer(str(shared_model), dtype="float32", device="cpu")
    return np.concatenate(scorer.score(texts, metric="within_word_l2r"))


def test_pll_float32_on_cuda_equals_cpu(shared_model: Path, texts: list[str], cpu_exact: np.ndarray):
    from l3m.scoring import PLLScorer

    gpu = PLLScorer(str(shared_model), dtype="float32", device="cuda")
    assert gpu.device.type == "cuda" and gpu.compute_dtype == torch.float32
    scores = np.concatenate(gpu.score(texts, metric="within_word_l2r"))
    fin = np.isfinite(cpu_exact)
    assert np.array_equal(np.isfinite(scores), fin)
    # TF32 is off for float32 matmuls by default, so only summation order differs from the CPU.
    assert np.abs(scores[fin] - cpu_exact[fin]).max() < 1e-3


def test_pll_bf16_on_cuda_tracks_float32_cpu(shared_model: Path, texts: list[str], cpu_exact: np.ndarray):
    from l3m.scoring import PLLScorer

    gpu = PLLScorer(str(shared_model), dtype="bfloat16", device="cuda")
    assert gpu.compute_dtype == torch.bfloat16
    fin = np.isfinite(cpu_exact)
    exact = np.concatenate(gpu.score(texts, metric="within_word_l2r"))
    # The bounds of the CPU bf16 test (tests/test_scoring.py): bf16 keeps 8 bits of mantissa.
    assert spearmanr(cpu_exact[fin], exact[fin])[0] >= 0.99
    assert np.abs(cpu_exact[fin] - exact[fin]).max() < 0.25
    strided = np.concatenate(gpu.score(texts, metric="within_word_l2r", mode="strided", stride=4))
    assert np.array_equal(np.isfinite(strided), fin)  # every target scored once
    assert spearmanr(cpu_exact[fin], strided[fin])[0] >= 0.95


def test_multitask_training_steps_in_bf16_on_cuda(shared_model: Path, texts: list[str]):
    """Classification + MLM under bf16 autocast: float32 master weights, finite grads, learning."""
    from transformers import AutoTokenizer

    from l3m.modeling import build_multitask_model

    tok = AutoTokenizer.from_pretrained(shared_model)
    model = build_multitask_model(str(shared_model), LABELS, with_mlm=True).cuda().train()
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to("cuda")
    n = int(enc["input_ids"].shape[0])
    g = torch.Generator(device="cuda").manual_seed(0)
    picked = (torch.rand(enc["input_ids"].shape, generator=g, device="cuda") < 0.15) & enc["attention_mask"].bool()
    mlm_ids = enc["input_ids"].masked_fill(picked, tok.mask_token_id)
    batch = {**enc, "labels": torch.arange(n, device="cuda") % len(LABELS), "mlm_input_ids": mlm_ids,
             "mlm_labels": enc["input_ids"].masked_fill(~picked, -100)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_serving_forward_in_bf16_on_cuda_matches_float32_cpu(tmp_path: Path, shared_model: Path,
                                                             texts: list[str]):
    """serving.model_io.predict (what the service's batcher calls) on CUDA under bf16 autocast."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from serving.model_io import load_classifier, predict

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        shared_model, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)})
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(shared_model).save_pretrained(tmp_path)
    meta = {"domain": "gpu", "label_names": LABELS, "metric": "macro_f1", "metrics": {"dev": {"macro_f1": 0.0}},
            "strategy": "none", "tuner": "full", "base_model": str(shared_model), "max_length": 128}
    (tmp_path / "l3m.json").write_text(json.dumps(meta))
    clf, tok, m = load_classifier(tmp_path)
    ref = predict(clf, tok, m, texts)
    got = predict(clf.cuda(), tok, m, texts, dtype="bfloat16")
    diff = max(abs(a["probabilities"][k] - b["probabilities"][k]) for a, b in zip(ref, got, strict=True)
               for k in LABELS)
    assert diff < 0.05
    # A label may flip only where float32's top two are within that tolerance (an untrained head).
    for a, b in zip(ref, got, strict=True):
        top2 = sorted(a["probabilities"].values())[-2:]
        assert a["label"] == b["label"] or top2[1] - top2[0] < 0.1
