"""Serving benchmark: batching on vs off (batch size 1), side by side, on loopback; or hostile.

    .venv/bin/python bench/serving.py                       # builds a throwaway model + store
    .venv/bin/python bench/serving.py --model-dir runs/... --requests 2000 --levels 1,8,32
    .venv/bin/python bench/serving.py --hostile --requests 2000 --levels 32

``--hostile`` (issue #17): one server, 2,000 requests at the top level three times in a row:
clean, with every 10th request hostile (a 1 MB text, non-JSON content types, malformed JSON and
UTF-8, a text with no content tokens, a body over the limit; each status checked), and clean
again; plus a lone client's median latency before and after.

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
import functools
import itertools
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
from collections.abc import Callable
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
    home: Path, tag: str, batching: bool, log: Path, max_batch: int, dtype: str,
    service: str = "serving.service:L3MClassifier", env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """``bentoml serve`` of ``service`` on a free loopback port; ``env`` adds to its environment
    (``L3M_DOMAINS`` for ``serving.multi_service:L3MDomains``)."""
    port = free_port()
    env = os.environ | {
        "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "L3M_MODEL_TAG": tag,
        "L3M_TORCH_THREADS": os.environ.get("L3M_TORCH_THREADS", "1"),
        "L3M_BATCHING": "on" if batching else "off", "L3M_MAX_BATCH_SIZE": str(max_batch),
        "L3M_DTYPE": dtype,
    } | (env or {})
    cmd = [sys.executable, "-m", "bentoml", "serve", service,
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


HOSTILE_EVERY = 10  # every 10th request is hostile: 10% of the load
HOSTILE_TEXT_CHARS = 1_000_000  # a ~1 MB text: inside the default 1 MiB body limit


def hostile_request(k: int) -> tuple[str, bytes, dict[str, str], int]:
    """The k-th hostile request: (kind, body, headers, expected status). The issue #17 cases."""
    kinds = _hostile_kinds()
    return kinds[k % len(kinds)]


@functools.cache
def _hostile_kinds() -> list[tuple[str, bytes, dict[str, str], int]]:
    # Built once: the load generator shares the cores with the server, so re-encoding a 1 MB
    # body per request would slow the server's measurement down.
    js = {"content-type": "application/json"}
    kinds: list[tuple[str, bytes, dict[str, str], int]] = [
        ("1 MB text", json.dumps({"texts": ["We use the parser of Collins ( 1997 ) . " * (HOSTILE_TEXT_CHARS // 40)]})
         .encode(), js, 200),
        ("multipart, no boundary", b"xx", {"content-type": "multipart/form-data"}, 415),
        ("text/plain", b'{"texts": ["a"]}', {"content-type": "text/plain"}, 415),
        ("no content-type", b'{"texts": ["a"]}', {}, 415),
        ("malformed JSON", b'{"texts": ["unterminated', js, 400),
        ("zero-token text", json.dumps({"texts": ["\u200b\u200e\x00\ue000"]}).encode(), js, 400),
        ("invalid UTF-8", b'{"texts": ["\xff\xfe"]}', js, 400),
        ("body over the limit", b'{"texts": ["' + b"w " * (1 << 20) + b'"]}', js, 413),
    ]
    return kinds


async def run_load(url: str, texts: list[str], n: int | None, concurrency: int, offset: int = 0,
                   hostile: bool = False, request_json: Callable[[int], dict] | None = None,
                   seconds: float | None = None) -> dict:
    """n requests, at most `concurrency` in flight; one text per request. Raw measurements.
    With ``hostile``, every HOSTILE_EVERY-th request is a hostile one instead (not timed; its
    status is checked against the expected one). ``request_json(i)``: the i-th request's JSON instead of
    one text; ``seconds``: no request is started after that long (n None: no count bound)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    hostile_seen: dict[str, dict[int, int]] = {}
    unexpected = 0
    errors = 0
    counter = itertools.count(offset) if n is None else iter(range(offset, offset + n))
    stop_at = None if seconds is None else time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors, unexpected
            for i in counter:  # shared iterator: the whole run is bounded by n
                if stop_at is not None and time.perf_counter() >= stop_at:
                    return
                if hostile and i % HOSTILE_EVERY == HOSTILE_EVERY - 1:
                    kind, body, headers, expected = hostile_request(i // HOSTILE_EVERY)
                    try:
                        code = (await client.post("/classify", content=body, headers=headers)).status_code
                    except httpx.HTTPError:
                        code = 0
                    seen = hostile_seen.setdefault(kind, {})
                    seen[code] = seen.get(code, 0) + 1
                    unexpected += code != expected
                    continue
                body_json = request_json(i) if request_json else {"texts": [texts[i % len(texts)]]}
                t0 = time.perf_counter()
                try:
                    r = await client.post("/classify", json=body_json)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "statuses": statuses, "errors": errors, "wall": wall,
            "hostile": hostile_seen, "hostile_unexpected": unexpected}


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
    } | _hostile_summary(runs)


def _hostile_summary(runs: list[dict]) -> dict:
    seen: dict[str, dict[int, int]] = {}
    for r in runs:
        for kind, codes in r.get("hostile", {}).items():
            for code, v in codes.items():
                seen.setdefault(kind, {})[code] = seen.get(kind, {}).get(code, 0) + v
    if not seen:
        return {}
    return {"hostile": seen, "hostile_requests": sum(sum(c.values()) for c in seen.values()),
            "hostile_unexpected": sum(r.get("hostile_unexpected", 0) for r in runs),
            "hostile_5xx": sum(v for c in seen.values() for code, v in c.items() if code >= 500)}


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


def sequential_p50(url: str, texts: list[str], n: int = 30) -> float:
    """Median ms of n one-at-a-time requests: what a lone client sees (issue #17, lasting latency)."""
    seconds = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n):
            t0 = time.perf_counter()
            client.post("/classify", json={"texts": [texts[i]]}).raise_for_status()
            seconds.append(time.perf_counter() - t0)
    return round(statistics.median(seconds) * 1000, 1)


def _workers(proc: subprocess.Popen) -> list:
    import psutil

    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def worker_rss_mb(proc: subprocess.Popen) -> float:
    """Resident memory of the server's worker process(es), MB (the 1 MB texts once left ~1.8 GB)."""
    return round(sum(p.memory_info().rss for p in _workers(proc)) / 1e6, 1)


def worker_cpu_s(proc: subprocess.Popen) -> float:
    """CPU seconds the worker(s) used so far: per request, it does not depend on how much of the
    shared cores other tenants took, unlike latency and throughput."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in _workers(proc)))


def hostile_bench(work: Path, tag: str, texts: list[str], args: argparse.Namespace) -> dict:
    """One server (batching on): clean run, the same with 10% hostile requests, a clean run
    again right after; lone-client latency before and after."""
    c = max(int(x) for x in args.levels.split(","))
    proc, url = start_server(work / "bentoml", tag, True, work / "hostile.log", args.max_batch_size, args.dtype)
    try:
        wait_ready(proc, url)
        asyncio.run(run_load(url, texts, args.warmup, 16))
        rss_before = worker_rss_mb(proc)
        before = sequential_p50(url, texts)
        results = []
        for mode, hostile in (("clean", False), ("10% hostile", True), ("clean, right after", False)):
            cpu0 = worker_cpu_s(proc)
            r = summarize([asyncio.run(run_load(url, texts, args.requests, c, hostile=hostile))], c) | {"mode": mode}
            r["requests"] = args.requests
            r["server_cpu_ms_per_request"] = round((worker_cpu_s(proc) - cpu0) / args.requests * 1000, 1)
            r["load_average_1m"] = round(os.getloadavg()[0], 2)
            print(json.dumps(r), flush=True)
            results.append(r)
        after = sequential_p50(url, texts)
        rss_after = worker_rss_mb(proc)
    finally:
        stop(proc)
    return {"results": results, "lone_client_p50_ms": {"fresh": before, "after the three runs": after},
            "worker_rss_mb": {"after warm-up": rss_before, "after the three runs": rss_after},
            "log_tracebacks": (work / "hostile.log").read_text(errors="replace").count("Traceback")}


def hostile_markdown(report: dict) -> str:
    lines = ["| run | requests | valid | throughput (valid req/s) | p50 (ms) | p99 (ms) | failed valid | 5xx | "
             "hostile answered as expected | server CPU (ms/request) | load average |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        hostile_n = r.get("hostile_requests", 0)
        expected = f"{hostile_n - r.get('hostile_unexpected', 0)}/{hostile_n}" if hostile_n else "-"
        lines.append(f"| {r['mode']} | {r['requests']} | {r['ok'] + r['errors'] + r['non_200']} | "
                     f"{r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors'] + r['non_200']} | "
                     f"{r['status_5xx'] + r.get('hostile_5xx', 0)} | {expected} | "
                     f"{r['server_cpu_ms_per_request']} | {r['load_average_1m']} |")
    p50 = report["lone_client_p50_ms"]
    lines.append(f"\nLone client p50: {p50['fresh']} ms fresh, {p50['after the three runs']} ms after the runs; "
                 f"tracebacks in the server log: {report['log_tracebacks']}; worker RSS "
                 f"{report['worker_rss_mb']['after warm-up']} MB after warm-up, "
                 f"{report['worker_rss_mb']['after the three runs']} MB after the runs")
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
    ap.add_argument("--hostile", action="store_true",
                    help="clean / 10%% hostile / clean-again runs at the highest level on one server")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serving.json"))
    args = ap.parse_args()
    levels = sorted(int(x) for x in args.levels.split(","))

    from serving import registry

    work = Path(tempfile.mkdtemp(prefix="l3m-bench-serving-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    model_dir = args.model_dir or build_bench_model(work / "model")
    tag = registry.register(model_dir).tag
    texts = load_texts()
    if args.hostile:
        report = hostile_bench(work, tag, texts, args) | {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "model": str(model_dir), "tag": tag, "max_batch_size": args.max_batch_size, "dtype": args.dtype}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(hostile_markdown(report))
        return
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
