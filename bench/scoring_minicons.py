"""Run minicons' MaskedLMScorer.token_score in its own venv (transformers 4.x) and write JSON.

Invoked by bench/scoring.py as a subprocess of the bench-only venv; imports nothing of l3m.
Input JSON: {"model": path, "texts": [...], "metrics": [...], "per_call": int,
"repeats": int, "threads": int|null}. Output JSON: {"versions": {...}, "results": {metric:
{"scores": [[float, ...], ...], "tokens": [[str, ...], ...], "seconds": [..per repeat..],
"n_tokens": int, "peak_rss_mb": float}}}. Timings exclude model loading, as for l3m.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> None:
    cfg = json.load(open(sys.argv[1]))
    import minicons
    import torch
    import transformers
    from minicons import scorer

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    mlm = scorer.MaskedLMScorer(cfg["model"], "cpu")
    texts: list[str] = cfg["texts"]
    per_call = int(cfg.get("per_call", 1))
    out: dict = {
        "versions": {
            "minicons": getattr(minicons, "__version__", "0.3.39"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "results": {},
    }
    mlm.token_score(texts[:1], PLL_metric="original")  # warm-up (allocator, kernels)
    clock = time.process_time if cfg.get("cpu_clock") else time.perf_counter
    for metric in cfg["metrics"]:
        seconds = []
        res: list = []
        for _ in range(int(cfg.get("repeats", 1))):
            res = []
            t0 = clock()
            for a in range(0, len(texts), per_call):
                res.extend(mlm.token_score(texts[a : a + per_call], PLL_metric=metric))
            seconds.append(clock() - t0)
        out["results"][metric] = {
            "scores": [[float(s) for _, s in r] for r in res],
            "tokens": [[t for t, _ in r] for r in res],
            "seconds": seconds,
            "n_tokens": sum(len(r) for r in res),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
