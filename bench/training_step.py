"""Median training-step time, L3 vs RTM: L3 must cost no more (ratio <= 1.05).

A step = collate (masking included) + forward (classification + MLM) + backward + AdamW step,
on real citation_intent texts. L3 reads per-token log-likelihood columns, as in training;
their values do not change the cost, so they are synthetic here (no scoring needed). Steps of
the two strategies are interleaved so machine noise hits both alike.

    python bench/training_step.py [--steps 30] [--batch-size 16] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from l3m.config import DEFAULT_SHARED, ENV_DATA_ROOT, ENV_MODEL_ROOT, MaskingSpec
from l3m.masking import MaskingCollator, build_masking
from l3m.modeling import build_multitask_model


def features(tok, texts, max_length, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in texts:
        enc = tok(t, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        special = np.array(enc["special_tokens_mask"])
        logp = np.where(special == 1, np.nan, -rng.gamma(2.0, 2.0, len(special))).astype(np.float32)
        out.append({**enc, "label": 0, "token_logp": logp.tolist()})
    return out


def main():
    ap = argparse.ArgumentParser()
    models = Path(os.environ.get(ENV_MODEL_ROOT) or DEFAULT_SHARED / "models")
    data = Path(os.environ.get(ENV_DATA_ROOT) or DEFAULT_SHARED / "data")
    ap.add_argument("--model", default=str(models / "minilm-l6-mlm"))
    ap.add_argument("--data", default=str(data / "citation_intent" / "train.jsonl"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    texts = [json.loads(line)["text"] for line in Path(a.data).read_text().splitlines() if line.strip()]
    n = a.batch_size * (a.steps + a.warmup)
    feats = features(tok, (texts * (n // len(texts) + 1))[:n], a.max_length)
    batches = [feats[i : i + a.batch_size] for i in range(0, n, a.batch_size)]
    runs = {}
    for kind in ("random", "l3"):
        strategy = build_masking(MaskingSpec(kind=kind, rate=0.15))
        model = build_multitask_model(a.model, ["a", "b"], with_mlm=True).to(a.device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        runs[kind] = (MaskingCollator(tok, strategy, seed=0), model, opt)
    times = {k: [] for k in runs}
    collate_times = {k: [] for k in runs}
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if a.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    for i, batch in enumerate(batches):
        for kind, (coll, model, opt) in runs.items():
            sync()
            t0 = time.perf_counter()
            b = coll([dict(f) for f in batch])
            t1 = time.perf_counter()
            b = {k: v.to(a.device) for k, v in b.items()}
            with amp:
                loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= a.warmup:
                times[kind].append(time.perf_counter() - t0)
                collate_times[kind].append(t1 - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "model": Path(a.model).name, "batch_size": a.batch_size, "max_length": a.max_length, "steps": a.steps,
        "median_step_ms": {k: round(1000 * v, 2) for k, v in med.items()},
        "median_collate_ms": {k: round(1000 * statistics.median(v), 3) for k, v in collate_times.items()},
        "realised_rate": {k: round(runs[k][0].stats.realised_rate, 4) for k in runs},
        "ratio_l3_over_rtm": round(med["l3"] / med["random"], 4),
    }
    result["pass"] = result["ratio_l3_over_rtm"] <= 1.05
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
