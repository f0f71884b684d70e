"""Serving benchmark: adaptive batching on vs off (batch size 1), side by side, on loopback.

    .venv/bin/python bench/serving.py                       # builds a throwaway model + store
    .venv/bin/python bench/serving.py --model-dir runs/... --requests 2000 --levels 1,8,32

Two `bentoml serve` processes are started on 127.0.0.1 (L3M_BATCHING=on / off, same model);
this process is the load generator (asyncio + httpx), a bounded number of requests per
(server, concurrency level), one text per request, texts from the citation_intent test/dev
splits. The servers are measured alternately at each level so drifting background load on a
shared machine hits both alike. With a model trained by l3m (--model-dir), both servers then
replay its stored offline test predictions (served == offline, ``serving/verify.py``). Prints a
Markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BASE_MODEL = Path(os.environ.get("L3M_MODEL_ROOT", ROOT.parent / "shared" / "models")) / "minilm-l6-mlm"
DATA = Path(os.environ.get("L3M_DATA_ROOT", ROOT.parent / "shared" / "data")) / "citation_intent"


def build_bench_model(out: Path) -> Path:
    """Base MLM + fresh classification head: speed does not depend on the head being trained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(x) for x in (DATA / "train.jsonl").read_text().splitlines() if x.strip()]
    labels = sorted({r["label"] for r in rows})
    model = AutoModelForSequenceClassification.from_pretrained(
        str(BASE_MODEL), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(BASE_MODEL)).save_pretrained(str(out))
    meta = {"domain": "citation_intent", "label_names": labels, "metric": "macro_f1",
            "metrics": {"dev": {"macro_f1": 0.0}, "test": {"macro_f1": 0.0}}, "strategy": "none",
            "tuner": "full", "base_model": str(BASE_MODEL), "base_revision": None, "config": {},
            "data_fingerprint": None, "score_key": None, "max_length": 128, "text_pair": False,
            "code_version": "bench"}
    (out / "l3m.json").write_text(json.dumps(meta))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    home: Path, tag: str, batching: bool, log: Path, max_batch: int, dtype: str
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {
        "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "L3M_MODEL_TAG": tag,
        "L3M_TORCH_THREADS": os.environ.get("L3M_TORCH_THREADS", "1"),
        "L3M_BATCHING": "on" if batching else "off", "L3M_MAX_BATCH_SIZE": str(max_batch),
        "L3M_DTYPE": dtype,
    }
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:L3MClassifier",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {url} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server {url} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # only the process group this script started


async def run_load(url: str, texts: list[str], n: int, concurrency: int, offset: int = 0) -> dict:
    """n requests, at most `concurrency` in flight; one text per request. Raw measurements."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    counter = iter(range(offset, offset + n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            for i in counter:  # shared iterator: the whole run is bounded by n
                body = {"texts": [texts[i % len(texts)]]}
                t0 = time.perf_counter()
                try:
                    r = await client.post("/classify", json=body)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "statuses": statuses, "errors": errors, "wall": wall}


def summarize(runs: list[dict], concurrency: int) -> dict:
    """Pool the rounds of one (mode, level): throughput = all OK responses / summed wall time."""
    latencies = [x for r in runs for x in r["latencies"]]
    statuses: dict[int, int] = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    wall = sum(r["wall"] for r in runs)
    ok = statuses.get(200, 0)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": sum(statuses.values()) + sum(r["errors"] for r in runs), "concurrency": concurrency,
        "ok": ok, "errors": sum(r["errors"] for r in runs),
        "non_200": sum(v for k, v in statuses.items() if k != 200),
        "status_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "wall_s": round(wall, 3), "throughput_rps": round(ok / wall, 1),
        "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else 0.0,
    }


def load_texts() -> list[str]:
    texts = []
    for split in ("test", "dev"):
        texts += [json.loads(x)["text"] for x in (DATA / f"{split}.jsonl").read_text().splitlines() if x.strip()]
    return texts


def model_ceiling(model_dir: Path, texts: list[str], threads: int, dtype: str) -> dict:
    """In-process ms/text of the forward path alone (no HTTP): batch 1 vs a 32-text batch.

    The ratio bounds what adaptive batching can gain on this host: the HTTP path adds the same
    per-request cost to both modes. With a non-float32 dtype, also the share of labels equal
    to float32's on the same texts.
    """
    import torch

    from serving.model_io import load_classifier, predict

    torch.set_num_threads(threads)
    model, tok, meta = load_classifier(model_dir)
    sample = texts[:128]

    def per_text(bs: int) -> float:
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            for i in range(0, len(sample), bs):
                predict(model, tok, meta, sample[i:i + bs], dtype=dtype)
            best = min(best, (time.perf_counter() - t0) / len(sample) * 1000)
        return round(best, 2)

    one, batched = per_text(1), per_text(32)
    out = {"dtype": dtype, "ms_per_text_batch1": one, "ms_per_text_batch32": batched, "ratio": round(one / batched, 2)}
    if dtype != "float32":
        ref = [p["label"] for p in predict(model, tok, meta, texts)]
        low = [p["label"] for p in predict(model, tok, meta, texts, dtype=dtype)]
        out["labels_equal_to_float32"] = f"{sum(a == b for a, b in zip(ref, low, strict=True))}/{len(texts)}"
    return out


def served_vs_offline(model_dir: Path, urls: dict[str, str]) -> dict:
    """Each server replays the offline evaluation's test predictions stored with a model trained by
    l3m (``l3m models verify``); the default bench model has none, so this is skipped for it."""
    from serving.verify import predictions_path, verify

    try:
        predictions_path(model_dir, "test")
    except FileNotFoundError as e:
        return {"skipped": str(e)}
    out = {}
    for mode, url in urls.items():
        rep = verify(url, model_dir, "test", texts_per_request=4, concurrency=8).to_dict()
        out[mode] = rep
        print(json.dumps({"served_vs_offline": mode} | {k: rep[k] for k in ("n", "ok", "label_agreement", "max_prob_diff",
                                                                           "served_accuracy", "offline_accuracy")}), flush=True)
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| concurrency | requests | mode | throughput (req/s) | p50 (ms) | p99 (ms) | failed | 5xx |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['mode']} | {r['throughput_rps']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['errors'] + r['non_200']} | {r['status_5xx']} |")
    lines.append("")
    by = {(r["concurrency"], r["mode"]): r for r in results}
    for c in sorted({r["concurrency"] for r in results}):
        on, off = by.get((c, "batching")), by.get((c, "batch size 1"))
        if on and off and off["throughput_rps"]:
            lines.append(f"- concurrency {c}: throughput x{on['throughput_rps'] / off['throughput_rps']:.2f}, "
                         f"p99 {on['p99_ms']} vs {off['p99_ms']} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="trained model directory (default: base MLM + fresh head)")
    ap.add_argument("--requests", type=int, default=2000, help="requests at the highest concurrency level")
    ap.add_argument("--levels", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--low-requests", type=int, default=400, help="requests at the lower levels")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds per level")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="L3M_DTYPE of both servers: float32 or bfloat16 (autocast)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serving.json"))
    args = ap.parse_args()
    levels = sorted(int(x) for x in args.levels.split(","))

    from serving import registry

    work = Path(tempfile.mkdtemp(prefix="l3m-bench-serving-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    model_dir = args.model_dir or build_bench_model(work / "model")
    tag = registry.register(model_dir).tag
    texts = load_texts()
    servers = {}
    try:
        for mode, batching in (("batching", True), ("batch size 1", False)):
            servers[mode] = start_server(work / "bentoml", tag, batching, work / f"{mode[:5]}.log",
                                         args.max_batch_size, args.dtype)
        for proc, url in servers.values():
            wait_ready(proc, url)
        results = []
        for _proc, url in servers.values():  # warm-up also trains BentoML's batching optimizer
            asyncio.run(run_load(url, texts, args.warmup, 16))
        for c in levels:
            n = args.requests if c == max(levels) else args.low_requests
            per_round = -(-n // args.rounds)
            raw: dict[str, list[dict]] = {mode: [] for mode in servers}
            # Rounds alternate between the two servers so background load on a shared machine
            # lands on both modes alike; each mode still gets n requests at this level.
            for k in range(args.rounds):
                for mode, (_, url) in servers.items():
                    m = min(per_round, n - k * per_round)
                    if m > 0:
                        raw[mode].append(asyncio.run(run_load(url, texts, m, c, offset=k * per_round)))
            for mode, runs in raw.items():
                r = summarize(runs, c) | {"mode": mode}
                print(json.dumps(r), flush=True)
                results.append(r)
        parity = served_vs_offline(model_dir, {mode: url for mode, (_, url) in servers.items()})
    finally:
        for proc, _ in servers.values():
            stop(proc)
    ceiling = model_ceiling(model_dir, texts, int(os.environ.get("L3M_TORCH_THREADS", "1")), args.dtype)
    print(json.dumps({"in_process_forward": ceiling}), flush=True)
    report = {"in_process_forward": ceiling, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "model": str(model_dir), "tag": tag, "max_batch_size": args.max_batch_size, "dtype": args.dtype, "results": results,
              "served_vs_offline": parity}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
