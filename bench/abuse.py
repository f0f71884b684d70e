"""One abusive client against the others (issue #24): normal clients' latency with and without it.

    .venv/bin/python bench/abuse.py                      # builds a throwaway model + store
    .venv/bin/python bench/abuse.py --rounds 3 --window 10 --normal-clients 4
    .venv/bin/python bench/abuse.py --reproducers-only --url http://127.0.0.1:3000

One `bentoml serve` on 127.0.0.1. ``--normal-clients`` clients (one keep-alive connection each,
one citation text per request, the next sent when the last is answered) run throughout, in
windows that alternate *clean* and *abused* (``--rounds`` of each, ``--window`` seconds), so
drifting background load on a shared machine lands on both alike. In the abused windows a
separate process (so its CPU use on the client side does not delay the normal clients' event
loop) plays one abuser: ``--abuser-streams`` request loops cycling through the most expensive
valid and invalid requests (``abuse_kinds``: long "words" that cost WordPiece the most, the
item-count limit, huge numbers, repeated headers, a 1 MB text) plus ``--slow-connections``
raw connections that send their request head a byte at a time or nothing at all. /readyz is
probed every second in both. Reports the normal clients' p50/p99 per mode, their 5xx, the
abuser's statuses per kind, and each issue reproducer's status and time (alone, before the load).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_serving", Path(__file__).with_name("serving.py"))
assert _spec is not None and _spec.loader is not None
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)

LONG_WORD = "q" * 99 + "\u0f00"  # 100 characters: WordPiece's longest word, quadratic, one [UNK]
JS = {"content-type": "application/json"}


def abuse_kinds(max_texts: int = 64) -> list[tuple[str, bytes, dict[str, str]]]:
    """(kind, body, headers): the issue #24 reproducers and their neighbours."""
    long_words = " ".join([LONG_WORD] * 40)  # ~4 KB of the costliest words
    return [
        ("9000 long words (count limit)", json.dumps({"texts": [LONG_WORD] * 9000}).encode(), JS),
        (f"{max_texts} x 4 KB of long words", json.dumps({"texts": [long_words] * max_texts}).encode(), JS),
        ("1 x 4 KB of long words", json.dumps({"texts": [long_words]}).encode(), JS),
        ("4301-digit integer", b'{"texts": ["fine"], "n": ' + b"9" * 4301 + b"}", JS),
        ("two content-types", b'{"texts": ["fine"]}', {"content-type": "multipart/form-data"}),
        ("1 MB text", json.dumps({"texts": ["w " * 520_000]}).encode(), JS),
    ]


def _raw_post(host: str, port: int, body: bytes, headers: list[tuple[str, str]], timeout: float) -> int:
    """POST with headers exactly as given (httpx merges repeated ones); the status code, 0 if none."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    req = (f"POST /classify HTTP/1.1\r\nhost: {host}\r\n{head}content-length: {len(body)}\r\n"
           "connection: close\r\n\r\n").encode() + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(req)
        data = b""
        while b"\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0


def send_kind(url: str, kind: str, body: bytes, headers: dict[str, str], timeout: float = 150) -> int:
    host, port = url.removeprefix("http://").split(":")
    if kind == "two content-types":
        return _raw_post(host, int(port), body, [("content-type", "multipart/form-data"),
                                                 ("content-type", "application/json")], timeout)
    return httpx.post(f"{url}/classify", content=body, headers=headers, timeout=timeout).status_code


def reproducers(url: str) -> list[dict]:
    """Each abuse kind alone: status and seconds; and how long 20 idle connections stay open."""
    out = []
    for kind, body, headers in abuse_kinds():
        t0 = time.perf_counter()
        try:
            status = send_kind(url, kind, body, headers)
        except (httpx.HTTPError, OSError) as e:
            status = f"{type(e).__name__}"
        out.append({"kind": kind, "status": status, "seconds": round(time.perf_counter() - t0, 2)})
        print(json.dumps(out[-1]), flush=True)
    out.append(idle_connections_closed(url, 20, 30))
    print(json.dumps(out[-1]), flush=True)
    return out


def idle_connections_closed(url: str, n: int, wait_s: float) -> dict:
    """Open n connections that send nothing (half) or half a request head; seconds until each closes."""
    host, port = url.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port)), timeout=wait_s) for _ in range(n)]
    for s in socks[::2]:
        s.sendall(b"POST /classify HTTP/1.1\r\nhost: x\r\n")
    t0 = time.perf_counter()
    closed = []
    for s in socks:
        try:
            s.settimeout(max(0.1, wait_s - (time.perf_counter() - t0)))
            while s.recv(4096):
                pass
            closed.append(time.perf_counter() - t0)
        except OSError:
            pass
        finally:
            s.close()
    return {"kind": f"{n} idle / slow-header connections", "closed": f"{len(closed)}/{n}",
            "seconds": round(max(closed), 1) if closed else None, "waited_s": wait_s}


# ------------------------------------------------------------------- the abuser process ------


def abuser(url: str, on: Any, stop: Any, streams: int, slow: int, out: Any) -> None:
    import logging

    logging.getLogger("asyncio").setLevel(logging.ERROR)  # writes to connections the server closed
    asyncio.run(_abuse(url, on, stop, streams, slow, out))


async def _abuse(url: str, on: Any, stop: Any, streams: int, slow: int, out: Any) -> None:
    kinds = abuse_kinds()
    counts: dict[str, dict[int, int]] = {}
    loop = asyncio.get_running_loop()

    async def stream(k: int) -> None:
        while not stop.is_set():
            if not on.is_set():
                await asyncio.sleep(0.1)
                continue
            kind, body, headers = kinds[k % len(kinds)]
            k += 1
            try:
                status = await loop.run_in_executor(None, send_kind, url, kind, body, headers, 30)
            except (httpx.HTTPError, OSError):
                status = 0
            counts.setdefault(kind, {}).setdefault(status, 0)
            counts[kind][status] += 1

    async def slow_conn(i: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        while not stop.is_set():
            if not on.is_set():
                await asyncio.sleep(0.1)
                continue
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                head = b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                for b in head[: (i % 2) * len(head)]:  # odd ones: a byte a second; even ones: nothing
                    if stop.is_set() or reader.at_eof():
                        break
                    writer.write(bytes([b]))
                    await asyncio.sleep(1)
                await asyncio.wait_for(reader.read(), 60)
                writer.close()
            except (OSError, TimeoutError):
                await asyncio.sleep(0.5)

    await asyncio.gather(*(stream(k) for k in range(streams)), *(slow_conn(i) for i in range(slow)))
    out.put(counts)


# ------------------------------------------------------------------- normal clients ----------


async def normal_client(url: str, texts: list[str], k: int, until: float, lat: list[float], codes: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        i = k
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                r = await client.post("/classify", json={"texts": [texts[i % len(texts)]]})
                code = r.status_code
            except httpx.HTTPError:
                code = 0
            lat.append(time.perf_counter() - t0)
            codes[code] = codes.get(code, 0) + 1
            i += 7


async def probe_ready(url: str, until: float, probes: list[tuple[float, int]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                code = (await client.get("/readyz")).status_code
            except httpx.HTTPError:
                code = 0
            probes.append((time.perf_counter() - t0, code))
            await asyncio.sleep(max(0.0, 1 - (time.perf_counter() - t0)))


async def window(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    until = time.monotonic() + seconds
    lat: list[float] = []
    codes: dict[int, int] = {}
    probes: list[tuple[float, int]] = []
    await asyncio.gather(*(normal_client(url, texts, k, until, lat, codes) for k in range(clients)),
                         probe_ready(url, until, probes))
    return {"lat": lat, "codes": codes, "probes": probes}


def summary(runs: list[dict], seconds: float) -> dict:
    lat = sorted(x for r in runs for x in r["lat"])
    codes: dict[int, int] = {}
    for r in runs:
        for c, n in r["codes"].items():
            codes[c] = codes.get(c, 0) + n
    probes = [p for r in runs for p in r["probes"]]

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else float("nan")

    return {"requests": len(lat), "throughput_rps": round(len(lat) / seconds, 1), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "max_ms": round(lat[-1] * 1000, 1) if lat else None,
            "status": {str(k): v for k, v in sorted(codes.items())},
            "status_5xx": sum(n for c, n in codes.items() if c >= 500), "no_answer": codes.get(0, 0),
            "readyz": f"{sum(1 for _, c in probes if c == 200)}/{len(probes)}",
            "readyz_max_ms": round(max((s for s, _ in probes), default=0) * 1000, 1)}


def abuse_bench(url: str, texts: list[str], args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    on, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=abuser, args=(url, on, stop, args.abuser_streams, args.slow_connections, out))
    proc.start()
    runs: dict[str, list[dict]] = {"clean": [], "with abuser": []}
    try:
        for _ in range(args.rounds):
            for mode in runs:
                (on.set if mode == "with abuser" else on.clear)()
                runs[mode].append(asyncio.run(window(url, texts, args.normal_clients, args.window)))
                print(json.dumps({"mode": mode} | summary(runs[mode][-1:], args.window)), flush=True)
    finally:
        on.clear()
        stop.set()
        abused = out.get(timeout=120)
        proc.join(timeout=30)
    report = {mode: summary(r, args.window * len(r)) for mode, r in runs.items()}
    report["abuser"] = {kind: {str(k): v for k, v in sorted(c.items())} for kind, c in abused.items()}
    clean, bad = report["clean"]["p99_ms"], report["with abuser"]["p99_ms"]
    report["p99_ratio"] = round(bad / clean, 2)
    return report


def markdown(report: dict) -> str:
    lines = ["| normal clients | requests | req/s | p50 (ms) | p99 (ms) | max (ms) | 5xx | no answer | /readyz 200 | /readyz max (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("clean", "with abuser"):
        r = report[mode]
        lines.append(f"| {mode} | {r['requests']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['max_ms']} | {r['status_5xx']} | {r['no_answer']} | {r['readyz']} | {r['readyz_max_ms']} |")
    lines += ["", f"p99 with / without the abuser: {report['p99_ratio']}", "",
              "| abuser's request | answers |", "|---|---|"]
    lines += [f"| {kind} | {codes} |" for kind, codes in report["abuser"].items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--normal-clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=10, help="seconds per clean / abused window")
    ap.add_argument("--abuser-streams", type=int, default=2)
    ap.add_argument("--slow-connections", type=int, default=40)
    ap.add_argument("--reproducers-only", action="store_true")
    ap.add_argument("--no-reproducers", action="store_true", help="only the abuser benchmark")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/abuse.json"))
    args = ap.parse_args()
    texts = bs.load_texts()
    proc = None
    url = args.url
    if url is None:
        from serving import registry

        work = Path(tempfile.mkdtemp(prefix="l3m-bench-abuse-"))
        os.environ["BENTOML_HOME"] = str(work / "bentoml")
        tag = registry.register(bs.build_bench_model(work / "model")).tag
        proc, url = bs.start_server(work / "bentoml", tag, True, work / "abuse.log", 64, "float32")
    try:
        if proc is not None:
            bs.wait_ready(proc, url)
            asyncio.run(bs.run_load(url, texts, 100, 8))
        report: dict = {} if args.no_reproducers else {"reproducers": reproducers(url)}
        if not args.reproducers_only:
            report |= abuse_bench(url, texts, args)
    finally:
        if proc is not None:
            bs.stop(proc)
    report["settings"] = vars(args) | {"out": str(args.out), "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if not args.reproducers_only:
        print(markdown(report))


if __name__ == "__main__":
    main()
