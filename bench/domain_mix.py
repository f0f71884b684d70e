"""Mixed-domain against single-domain traffic through the multi-domain path, in one process.

The domains of a ``bench.domain_scaling --prepare`` store are loaded as the multi-domain service
loads them (``serving.domains``) behind its batcher (one domain per batch, domains taking
turns); ``--clients`` concurrent clients each send requests of ``--texts`` citation_intent test
texts for ``--seconds``, either all to the first domain (single) or each request to the next
of ``--domains`` domains (mixed). Reports requests and texts per second and latency
percentiles. In-process: the model and batching path without HTTP (``bench/serving.py`` is the
HTTP benchmark).

    python -m bench.domain_mix --store /tmp/scale --tuner weight_mask --domains 4 --mode mixed
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def run(store: Path, tuner: str, n_domains: int, mode: str, clients: int, texts: int, seconds: float
        ) -> dict[str, Any]:
    os.environ["BENTOML_HOME"] = str(store / "bentoml")
    from l3m.evaluate import read_predictions
    from serving import registry
    from serving.batcher import MicroBatcher
    from serving.domains import DomainSet, Served
    from serving.model_io import predict_encoded
    from serving.textbound import encode_inputs

    torch.set_num_threads(1)
    names = [f"{tuner}_{i:02d}" for i in range(n_domains)]
    domains = DomainSet(names, registry.model_path, registry.model_path)
    domains.refresh(force=True)
    first = domains.get(names[0])
    pool = [r["text"] for r in read_predictions(first.path / "predictions" / "test.jsonl")]

    def batch(items: list[tuple[Served, Any]]) -> list[Any]:
        served = items[0][0]
        return predict_encoded(served.model, served.tokenizer, served.meta, [r for _, r in items])

    latencies: list[float] = []
    order = itertools.cycle(names if mode == "mixed" else names[:1])
    requests = itertools.count()

    async def client(batcher: MicroBatcher, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            i = next(requests)
            served = domains.get(next(order))
            chunk = [pool[(i * texts + k) % len(pool)] for k in range(texts)]
            t0 = time.monotonic()
            rows = encode_inputs(served.tokenizer, served.meta.max_length, None, chunk, None)
            await batcher.submit([(served, r) for r in rows], key=served.meta.domain)
            latencies.append(time.monotonic() - t0)

    async def main() -> float:
        batcher = MicroBatcher(batch, max_batch_texts=64, max_queue_texts=1 << 16)
        t0 = time.monotonic()
        await asyncio.gather(*(client(batcher, t0 + seconds) for _ in range(clients)))
        batcher.close()
        return time.monotonic() - t0

    wall = asyncio.run(main())
    lat = sorted(latencies)
    return {"tuner": tuner, "domains": n_domains, "mode": mode, "clients": clients, "texts_per_request": texts,
            "requests": len(lat), "requests_per_s": len(lat) / wall, "texts_per_s": len(lat) * texts / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--tuner", choices=["weight_mask", "lora"], default="weight_mask")
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--mode", choices=["single", "mixed"], default="mixed")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    print(json.dumps(run(args.store, args.tuner, args.domains, args.mode, args.clients, args.texts, args.seconds)))


if __name__ == "__main__":
    main()
