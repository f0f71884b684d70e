"""Builders for trained model directories (the registry/serving contract) used by serving tests.

Training code lives elsewhere; these directories are made the way training will make them:
``save_pretrained`` (safetensors) + tokenizer + a hand-written ``l3m.json``. The classifier is
fine-tuned for a few steps on citation_intent so its predictions are not uniform noise.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BASE_MODEL = Path("/work/shared/models/minilm-l6-mlm")
DATA = Path("/work/shared/data/citation_intent")
MAX_LENGTH = 64

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded, then restore: on this shared 2-vCPU host two intra-op threads
    made small forward passes 10-20x slower under co-tenant load (docs/benchmarks.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_split(name: str) -> list[dict[str, Any]]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def label_names() -> list[str]:
    return sorted({r["label"] for r in read_split("train")})


def write_meta(out: Path, *, dev: float, domain: str = "citation_intent", text_pair: bool = False,
               strategy: str = "l3", labels: list[str] | None = None) -> None:
    names = labels or label_names()

    def report(score: float) -> dict[str, Any]:
        # The shape l3m.train writes: headline numbers + per-class table + confusion matrix.
        return {"accuracy": score, "macro_f1": score, "n": 100,
                "per_class": {n: {"precision": score, "recall": score, "f1-score": score, "support": 10} for n in names},
                "confusion_matrix": [[1] * len(names) for _ in names], "confusion_labels": names}

    meta = {
        "domain": domain,
        "label_names": names,
        "metrics": {"dev": report(dev), "test": report(dev - 0.01)},
        "metric": "macro_f1",
        "strategy": {"kind": strategy, "rate": 0.15, "mode": "calibrated"},
        "tuner": {"kind": "full", "reserve_p": 0.3},
        "seed": 1,
        "base_model": str(BASE_MODEL),
        "base_revision": None,
        "config": {"training": {"epochs": 0.1}, "model": {"max_length": MAX_LENGTH}},
        "data_fingerprint": "test-fingerprint",
        "score_key": "test-score-key",
        "max_length": MAX_LENGTH,
        "text_pair": text_pair,
        "code_version": "test",
    }
    (out / "l3m.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def build_model_dir(out: Path, *, steps: int = 4, seed: int = 0, dev: float = 0.5) -> Path:
    """A small fine-tuned classifier directory honouring the trained-model contract."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    labels = label_names()
    tok = AutoTokenizer.from_pretrained(str(BASE_MODEL))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(BASE_MODEL), num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )
    rows = read_split("train")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    with one_torch_thread():
        _train_steps(model, tok, opt, rows, labels, steps)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_meta(out, dev=dev)
    write_offline_predictions(out, "test")
    return out


def write_offline_predictions(model_dir: Path, split: str) -> None:
    """``predictions/<split>.jsonl`` as l3m.train writes it (l3m.evaluate.prediction_records), from
    ``offline_logits``: the reference ``l3m models verify`` replays."""
    from l3m.evaluate import PREDICTIONS_DIR, prediction_records, write_predictions
    from serving.model_io import read_meta

    meta = read_meta(model_dir)
    rows = read_split(split)
    texts = [r["text"] for r in rows]
    gold = [meta.label_names.index(r["label"]) for r in rows]
    records = prediction_records(offline_logits(model_dir, texts), gold, meta.label_names, texts)
    write_predictions(model_dir / PREDICTIONS_DIR / f"{split}.jsonl", records)


def _train_steps(model: Any, tok: Any, opt: Any, rows: list[dict[str, Any]], labels: list[str], steps: int) -> None:
    import torch

    for step in range(steps):
        chunk = rows[step * 16:(step + 1) * 16]
        batch = tok([r["text"] for r in chunk], truncation=True, max_length=MAX_LENGTH,
                    padding=True, return_tensors="pt")
        y = torch.tensor([labels.index(r["label"]) for r in chunk])
        loss = model(**batch, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def build_tiny_model_dir(out: Path) -> Path:
    """A randomly initialised 2-layer BERT classifier (a few MB): registry tests that only move
    files around do not need the real weights, and copying 90 MB per version is slow here."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    labels = label_names()
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={n: i for i, n in enumerate(labels)})
    out.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(BASE_MODEL)).save_pretrained(str(out))
    write_meta(out, dev=0.5)
    return out


def copy_with_dev(src: Path, out: Path, dev: float, **meta_kw: Any) -> Path:
    """Same weights, different recorded dev score (promotion tests need better/worse versions)."""
    import shutil

    shutil.copytree(src, out)
    write_meta(out, dev=dev, **meta_kw)
    return out


def trained_model_dir(base_temp: Path) -> Path:
    """The fine-tuned directory, built once per pytest session (shared by the test modules)."""
    out = base_temp / "l3m-trained-citation_intent"
    if not (out / "l3m.json").exists():
        # 40 steps (~20 s): the model then predicts two classes on the test split (Background 118,
        # Uses 21; 4 steps predicted only Background), so served == offline tests a real boundary.
        build_model_dir(out, steps=40)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_logits(model_dir: Path, texts: list[str]) -> Any:
    """Logits [n, labels] (numpy), one unpadded forward pass per text: the offline-evaluation encoding."""
    import torch

    from serving.model_io import load_classifier

    model, tok, meta = load_classifier(model_dir)
    with torch.inference_mode(), one_torch_thread():
        rows = [model(**tok(t, None, truncation=True, max_length=meta.max_length, return_tensors="pt")).logits[0]
                for t in texts]
    return torch.stack(rows).numpy()


def offline_predictions(model_dir: Path, texts: list[str]) -> list[dict[str, Any]]:
    """Reference predictions (label and probability map per text) from ``offline_logits``."""
    import torch

    from serving.model_io import read_meta

    names = read_meta(model_dir).label_names
    probs = torch.softmax(torch.from_numpy(offline_logits(model_dir, texts)), dim=-1).tolist()
    out = []
    for row in probs:
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": names[best], "probabilities": dict(zip(names, row, strict=True))})
    return out


@contextlib.contextmanager
def bentoml_server(target: str, cwd: Path, env: dict[str, str], log_path: Path,
                   ready_timeout: float = 180) -> Iterator[tuple[str, Any]]:
    """A real ``bentoml serve TARGET`` on 127.0.0.1 (free port), ready: ``(url, Popen)``.
    Stopped with SIGINT, then SIGKILL of its own process group if it does not exit."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import pytest

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout  # bounded: a slow, shared CPU, not a hang
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in time:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this helper started, nothing else
            proc.wait(timeout=10)
