"""Builders for trained model directories (the registry/serving contract) used by serving tests.

Training code lives elsewhere; these directories are made the way training will make them:
``save_pretrained`` (safetensors) + tokenizer + a hand-written ``l3m.json``. The classifier is
fine-tuned for a few steps on citation_intent so its predictions are not uniform noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BASE_MODEL = Path("/work/shared/models/minilm-l6-mlm")
DATA = Path("/work/shared/data/citation_intent")
MAX_LENGTH = 64

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def read_split(name: str) -> list[dict[str, Any]]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def label_names() -> list[str]:
    return sorted({r["label"] for r in read_split("train")})


def write_meta(out: Path, *, dev: float, domain: str = "citation_intent", text_pair: bool = False,
               strategy: str = "l3", labels: list[str] | None = None) -> None:
    meta = {
        "domain": domain,
        "label_names": labels or label_names(),
        "metrics": {"dev": {"accuracy": dev, "macro_f1": dev}, "test": {"accuracy": dev - 0.01, "macro_f1": dev - 0.01}},
        "metric": "macro_f1",
        "strategy": strategy,
        "tuner": "full",
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


def build_model_dir(out: Path, *, steps: int = 12, seed: int = 0, dev: float = 0.5) -> Path:
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
    for step in range(steps):
        chunk = rows[step * 16:(step + 1) * 16]
        batch = tok([r["text"] for r in chunk], truncation=True, max_length=MAX_LENGTH,
                    padding=True, return_tensors="pt")
        y = torch.tensor([labels.index(r["label"]) for r in chunk])
        loss = model(**batch, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_meta(out, dev=dev)
    return out


def copy_with_dev(src: Path, out: Path, dev: float, **meta_kw: Any) -> Path:
    """Same weights, different recorded dev score (promotion tests need better/worse versions)."""
    import shutil

    shutil.copytree(src, out)
    write_meta(out, dev=dev, **meta_kw)
    return out
