"""Benchmark: the generic scoring path against the packed one, side by side in one process.

Both scorers hold the same model (the shared BERT by default, where both paths apply) and score
the same texts, exact within_word_l2r, in alternating rounds (packed, generic, packed, ...), so
a busy machine slows both alike; each pair gives one ratio. Model loading is excluded. Also
checks that the two paths agree (max |diff| in nats).

    python bench/scoring_paths.py [--n 60] [--rounds 3] [--threads 1] [--out .bench/scoring_paths.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "minilm-l6-mlm"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "citation_intent" / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "scoring_paths.json"))
    args = ap.parse_args()

    import torch

    from l3m.scoring import PLLScorer

    torch.set_num_threads(args.threads)
    with open(args.data, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.n), fh, strict=False)]
    scorers = {name: PLLScorer(args.model, dtype="float32", device=args.device, packed=(name == "packed"))
               for name in ("packed", "generic")}  # fmt: skip
    kw = {"metric": "within_word_l2r", "max_length": args.max_length}
    scores = {name: s.score(texts[:4], **kw) for name, s in scorers.items()}  # warm-up
    rows = []
    for r in range(args.rounds):
        row: dict[str, float] = {}
        for name, s in scorers.items():
            t0 = time.perf_counter()
            scores[name] = s.score(texts, **kw)
            row[name] = time.perf_counter() - t0
        row["generic_over_packed"] = row["generic"] / row["packed"]
        rows.append(row)
        print(f"round {r + 1}: packed {row['packed']:.2f} s, generic {row['generic']:.2f} s, "
              f"ratio {row['generic_over_packed']:.2f}", flush=True)  # fmt: skip
    tokens = int(sum(np.isfinite(x).sum() for x in scores["packed"]))
    diff = max(float(np.nanmax(np.abs(a - b))) for a, b in zip(scores["packed"], scores["generic"], strict=True))
    ratios = [r["generic_over_packed"] for r in rows]
    report = {
        "model": args.model, "texts": len(texts), "tokens": tokens, "max_length": args.max_length,
        "threads": args.threads, "device": args.device, "rounds": rows,
        "paths": {n: {"path": s.path, "reason": s.path_reason} for n, s in scorers.items()},
        "tokens_per_s": {n: tokens / statistics.median(r[n] for r in rows) for n in scorers},
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "max_abs_diff_nats": diff,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
