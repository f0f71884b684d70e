"""Shared test setup: offline switches, per-session Prefect home, paths to ../shared assets."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="l3m-tests-"))
for k, v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
    "BENTOML_HOME": str(_SESSION_HOME / "bentoml"),
    "L3M_OUTPUT_ROOT": str(_SESSION_HOME / "runs"),
    "HF_DATASETS_CACHE": str(_SESSION_HOME / "hf-datasets"),
}.items():
    os.environ.setdefault(k, v)

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("L3M_SHARED", ROOT.parent / "shared"))
MODEL_DIR = SHARED / "models" / "minilm-l6-mlm"
DATA_DIR = SHARED / "data"


@pytest.fixture(scope="session")
def shared_model() -> Path:
    if not MODEL_DIR.exists():
        pytest.skip(f"shared model not found at {MODEL_DIR}")
    return MODEL_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA_DIR.exists():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def toy_domain(tmp_path: Path):
    """A small, clean 3-class domain on disk; returns a factory for its DomainConfig dict."""
    import random

    rng = random.Random(0)
    words = {"pos": "good great fine nice", "neg": "bad awful poor sad", "neu": "plain usual normal so-so"}

    def rows(n: int, tag: str) -> list[dict]:
        out = []
        for i in range(n):
            lab = ["pos", "neg", "neu"][i % 3]
            w = words[lab].split()
            out.append({"text": f"{tag} {i} " + " ".join(rng.choice(w) for _ in range(8)), "label": lab})
        return out

    for split, n in (("train", 60), ("dev", 15), ("test", 15)):
        write_jsonl(tmp_path / "toy" / f"{split}.jsonl", rows(n, split))

    def make(**over: object) -> dict:
        cfg = {"name": "toy", "data_root": str(tmp_path),
               "splits": {s: {"path": f"toy/{s}.jsonl"} for s in ("train", "dev", "test")}}
        cfg.update(over)
        return cfg

    make.root = tmp_path  # type: ignore[attr-defined]
    return make


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, shared_model: Path) -> Path:
    """A 2-layer random BERT MLM with the shared model's tokenizer, saved like a hub model.

    For plumbing tests only (flows, pipeline, serving); behaviour tests use the real model.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("tiny-mlm")
    tok = AutoTokenizer.from_pretrained(shared_model)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, shared_data: Path) -> dict[str, Path]:
    """A tiny random masked LM of every encoder family (tests/families.py), built once a session."""
    from families import FAMILIES, build

    root = tmp_path_factory.mktemp("families")
    return {name: build(name, root / name, shared_data) for name in FAMILIES}
