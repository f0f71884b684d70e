"""Mixed-domain against single-domain traffic through the multi-domain path: in one process, or
over HTTP against one real server (``--http``).

In-process (default): the domains of a ``bench.domain_scaling --prepare`` store are loaded as the
multi-domain service loads them (``serving.domains``) behind its batcher (one domain per batch,
domains taking turns); ``--clients`` concurrent clients each send requests of ``--texts``
citation_intent test texts for ``--seconds``, either all to the first domain (single) or each
request to the next of ``--domains`` domains (mixed). Reports requests and texts per second and
latency percentiles: the model and batching path without HTTP.

``--http``: one ``bentoml serve serving.multi_service:L3MDomains`` of the same ``--domains``
domains (``L3M_DOMAINS``; batching on, batches up to 64 texts, one torch thread: the settings of
``bench/serving.py``, whose server start, readiness wait and asyncio + httpx load this reuses) on a
free loopback port; after a mixed warm-up, ``--rounds`` rounds of each traffic (same clients,
texts per request and texts as in-process) alternate on that one server, in pairs ordered
single-mixed, mixed-single, ... so drifting background load lands on both alike. Per round:
requests, texts/s, p50, p99, non-200 answers (must be 0), the worker's CPU ms per text and the
host load average; per pair, mixed/single of texts/s and of p99. Prints a Markdown table and
writes JSON (``--out``). The server writes BentoML's ``prometheus_multiproc_dir`` into the store's
BentoML home; copy the store first where it must stay untouched.

    python -m bench.domain_mix --store /tmp/scale --tuner weight_mask --domains 4 --mode mixed
    python -m bench.domain_mix --store /tmp/scale --tuner lora --domains 4 --http --rounds 3 \
        --out runs/bench/domain_mix_lora.json
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


def domain_names(tuner: str, n_domains: int) -> list[str]:
    return [f"{tuner}_{i:02d}" for i in range(n_domains)]


def text_pool(domain_dir: Path) -> list[str]:
    """The citation_intent test texts, in the order of the domain's stored offline predictions."""
    from l3m.evaluate import read_predictions

    return [r["text"] for r in read_predictions(domain_dir / "predictions" / "test.jsonl")]


def request_texts(pool: list[str], i: int, texts: int) -> list[str]:
    """The i-th request's texts: the pool in turn, ``texts`` at a time."""
    return [pool[(i * texts + k) % len(pool)] for k in range(texts)]


def run(store: Path, tuner: str, n_domains: int, mode: str, clients: int, texts: int, seconds: float
        ) -> dict[str, Any]:
    os.environ["BENTOML_HOME"] = str(store / "bentoml")
    from serving import registry
    from serving.batcher import MicroBatcher
    from serving.domains import DomainSet, Served
    from serving.model_io import predict_encoded
    from serving.textbound import encode_inputs

    torch.set_num_threads(1)
    names = domain_names(tuner, n_domains)
    domains = DomainSet(names, registry.model_path, registry.model_path)
    domains.refresh(force=True)
    pool = text_pool(domains.get(names[0]).path)

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
            chunk = request_texts(pool, i, texts)
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


def run_http(store: Path, tuner: str, n_domains: int, clients: int, texts: int, seconds: float, rounds: int,
             warmup: int = 64) -> dict[str, Any]:
    """One real multi-domain server; single and mixed rounds alternate on it (pairs ordered
    single-mixed, mixed-single, ...). Raw rounds, the pairs' ratios, the host's load average."""
    import tempfile

    from bench import serving as bs
    from serving import registry

    os.environ["BENTOML_HOME"] = str(store / "bentoml")
    names = domain_names(tuner, n_domains)
    first_tag = registry.production_tag(names[0])
    if first_tag is None:
        raise SystemExit(f"no production version of {names[0]} in {store / 'bentoml'}")
    pool = text_pool(registry.model_path(first_tag))

    def body(order: list[str]) -> Any:
        return lambda i: {"texts": request_texts(pool, i, texts), "domain": order[i % len(order)]}

    log = Path(tempfile.mkdtemp(prefix="l3m-bench-domain-mix-")) / "server.log"
    proc, url = bs.start_server(store / "bentoml", "", True, log, 64, "float32",
                                service="serving.multi_service:L3MDomains", env={"L3M_DOMAINS": ",".join(names)})
    results: list[dict[str, Any]] = []
    try:
        bs.wait_ready(proc, url)
        asyncio.run(bs.run_load(url, [], warmup, clients, request_json=body(names)))
        for k in range(rounds):
            pair = [("single", names[:1]), ("mixed", names)]
            for mode, order in pair if k % 2 == 0 else pair[::-1]:
                cpu0 = bs.worker_cpu_s(proc)
                raw = asyncio.run(bs.run_load(url, [], None, clients,
                                              request_json=body(order), seconds=seconds))
                r = bs.summarize([raw], clients)
                r = {"round": k + 1, "mode": mode, **r, "texts_per_s": round(r["ok"] * texts / r["wall_s"], 1),
                     "server_cpu_ms_per_text": round((bs.worker_cpu_s(proc) - cpu0) / max(1, r["ok"] * texts) * 1000, 2),
                     "load_average_1m": round(os.getloadavg()[0], 2)}
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        bs.stop(proc)
    pairs = []
    for k in range(rounds):
        by = {r["mode"]: r for r in results if r["round"] == k + 1}
        pairs.append({"round": k + 1,
                      "texts_per_s_mixed_over_single": round(by["mixed"]["texts_per_s"] / by["single"]["texts_per_s"], 3),
                      "p99_mixed_over_single": round(by["mixed"]["p99_ms"] / by["single"]["p99_ms"], 3)})
    return {"tuner": tuner, "domains": names, "clients": clients, "texts_per_request": texts, "seconds": seconds,
            "rounds": results, "pairs": pairs, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
            "server_log_tracebacks": log.read_text(errors="replace").count("Traceback")}


def http_markdown(report: dict[str, Any]) -> str:
    lines = ["| tuner | round | traffic | requests | texts/s | p50 (ms) | p99 (ms) | non-200 | "
             "server CPU (ms/text) | load average |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rounds"]:
        lines.append(f"| {report['tuner']} | {r['round']} | {r['mode']} | {r['requests']} | {r['texts_per_s']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['non_200'] + r['errors']} | "
                     f"{r['server_cpu_ms_per_text']} | {r['load_average_1m']} |")
    lines.append("")
    for p in report["pairs"]:
        lines.append(f"- round {p['round']}: mixed/single texts/s x{p['texts_per_s_mixed_over_single']}, "
                     f"p99 x{p['p99_mixed_over_single']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--tuner", choices=["weight_mask", "lora"], default="weight_mask")
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--mode", choices=["single", "mixed"], default="mixed", help="in-process only")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--http", action="store_true", help="alternate single and mixed rounds on one real server")
    parser.add_argument("--rounds", type=int, default=3, help="--http: rounds of each traffic")
    parser.add_argument("--out", type=Path, help="--http: JSON report (default runs/bench/domain_mix_<tuner>.json)")
    args = parser.parse_args()
    if args.http:
        report = run_http(args.store, args.tuner, args.domains, args.clients, args.texts, args.seconds, args.rounds)
        out = args.out or Path(f"runs/bench/domain_mix_{args.tuner}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(http_markdown(report))
        return
    print(json.dumps(run(args.store, args.tuner, args.domains, args.mode, args.clients, args.texts, args.seconds)))


if __name__ == "__main__":
    main()
