"""One client against the others (issue #24), in-process: the preflight lanes and budget, the
guard's new refusals and its 500, the left-truncation cut, the character limit below the first
probe, cancelled and BaseException batches, and reused pids. Against a real server:
tests/test_serving_abuse_server.py."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time

import pytest
from conftest_serving import BASE_MODEL

from serving.batcher import BatchFailed, MicroBatcher
from serving.guard import RequestGuard
from serving.preflight import Limits, Preflight, Refused
from serving.textbound import PROBE_CHARS_PER_TOKEN, Encoded, TextRejected, bounded_text, encode_inputs
from serving.workers import register_worker, unregister_worker

L = 64
LONG_WORD = "q" * 99 + "\u0f00"  # WordPiece's costliest word: 100 characters, one [UNK]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BASE_MODEL))


# ------------------------------------------------------------------- preflight ---------------


def _busy_encoder(cpu_s: float):
    def encode(text: str, pair: str | None) -> Encoded:
        if not text.strip():
            raise TextRejected("text is empty")
        end = time.thread_time() + (cpu_s if text.startswith("heavy") else 0.0)
        while time.thread_time() < end:
            pass
        return Encoded({"input_ids": [len(text)]}, False)

    return encode


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _preflight(cpu_s: float = 0.02, budget: float = 0.05, clock=time.monotonic, queue: int = 2) -> Preflight:
    limits = Limits(cpu_budget_s=budget, light_chars=100, heavy_share=0.5, heavy_queue=queue)
    return Preflight(lambda: _busy_encoder(cpu_s), max_chars=1000, limits=limits, clock=clock)


def test_over_budget_request_is_413_before_all_items_are_encoded():
    pre = _preflight(cpu_s=0.02, budget=0.05)
    with pytest.raises(Refused) as e:
        asyncio.run(pre.encode("a", ["heavy " + "x" * 200] * 20, None))
    assert e.value.status == 413
    done = int(e.value.message.split("spent after ")[1].split(" of ")[0])
    assert 2 <= done < 20  # stopped once the budget was spent, not after all 20 items
    pre.close()


def test_a_client_over_its_heavy_share_is_429_others_and_light_requests_are_served():
    clock = Clock()
    pre = _preflight(cpu_s=0.02, budget=0.05, clock=clock)  # burst: 0.05 CPU-s owed
    heavy = ["heavy " + "x" * 200]

    async def main():
        assert len(await pre.encode("abuser", heavy * 3, None)) == 3  # 0.06 CPU-s owed, repaid at 0.5/s
        with pytest.raises(Refused) as e:
            await pre.encode("abuser", heavy, None)
        assert e.value.status == 429 and e.value.retry_after == 1
        assert len(await pre.encode("abuser", ["light"], None)) == 1  # light requests are never shed
        assert len(await pre.encode("other", heavy * 3, None)) == 3  # another client has its own share
        clock.now += 1.0  # repaid
        assert len(await pre.encode("abuser", heavy, None)) == 1

    asyncio.run(main())
    pre.close()


def test_heavy_lane_takes_a_bounded_number_of_requests():
    pre = _preflight(cpu_s=0.3, budget=5.0, queue=2)
    heavy = ["heavy " + "x" * 200]

    async def main():
        tasks = [asyncio.ensure_future(pre.encode(f"client{i}", heavy, None)) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Refused) as e:
            await pre.encode("client9", heavy, None)
        assert e.value.status == 429 and "already being prepared" in e.value.message
        assert [len(r) for r in await asyncio.gather(*tasks)] == [1, 1]

    asyncio.run(main())
    pre.close()


def test_tokenizer_work_runs_off_the_event_loop(tok):
    """The event loop keeps ticking while a request of the costliest words is encoded."""
    from serving.textbound import default_max_chars

    encoder = lambda: lambda t, p: encode_inputs(tok, L, default_max_chars(L), [t], None, require_content=True)[0]  # noqa: E731
    pre = Preflight(encoder, default_max_chars(L), Limits(cpu_budget_s=10, light_chars=1024, heavy_share=1, heavy_queue=2))
    text = " ".join([LONG_WORD] * 20)  # 2 KB of 100-character words

    async def main():
        gaps: list[float] = []
        job = asyncio.ensure_future(pre.encode("a", [text] * 16, None))
        last = time.perf_counter()
        while not job.done():
            await asyncio.sleep(0.005)
            gaps.append(time.perf_counter() - last)
            last = time.perf_counter()
        return await job, time.perf_counter(), gaps

    t0 = time.perf_counter()
    rows, t1, gaps = asyncio.run(main())
    assert len(rows) == 16 and len(gaps) > 5
    # Before issue #24 this work ran on the loop: no tick at all until it was done.
    assert max(gaps) < max(0.25, (t1 - t0) / 3), (max(gaps), t1 - t0)
    pre.close()


def test_a_cancelled_request_stops_being_encoded():
    calls: list[str] = []

    def make():
        busy = _busy_encoder(0.02)

        def encode(text, pair):
            calls.append(text)
            return busy(text, pair)

        return encode

    pre = Preflight(make, 1000, Limits(cpu_budget_s=10, light_chars=100, heavy_share=0.5, heavy_queue=2))

    async def main():
        job = asyncio.ensure_future(pre.encode("a", ["heavy " + "x" * 200] * 100, None))
        await asyncio.sleep(0.2)
        job.cancel()
        await asyncio.sleep(0.2)  # the lane thread sees the cancellation at its next item
        n = len(calls)
        await asyncio.sleep(0.2)
        return n

    n = asyncio.run(main())
    assert 1 <= n < 100 and len(calls) == n  # stopped, and nothing more after
    pre.close()


def test_item_errors_name_their_position():
    pre = _preflight()
    with pytest.raises(Refused) as e:
        asyncio.run(pre.encode("a", ["fine", " "], None))
    assert e.value.status == 400 and e.value.message.startswith("texts.1: ")
    pre.close()


# ------------------------------------------------------------------- guard -------------------


def _guard_call(headers: list[tuple[bytes, bytes]], body: bytes, app=None) -> tuple[list[dict], bool, float]:
    sent: list[dict] = []
    reached = False

    async def default_app(scope, receive, send):
        nonlocal reached
        reached = True
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": headers}
    t0 = time.perf_counter()
    asyncio.run(RequestGuard(app or default_app, 1 << 20, body_timeout_s=5, max_texts=8)(scope, receive, send))
    return sent, reached, time.perf_counter() - t0


JSON = (b"content-type", b"application/json")


@pytest.mark.parametrize(("headers", "name"), [
    ([(b"content-type", b"multipart/form-data"), JSON], "content-type"),
    ([JSON, (b"content-length", b"17"), (b"content-length", b"17")], "content-length"),
    ([JSON, (b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], "transfer-encoding"),
])
def test_repeated_framing_headers_are_400(headers, name):
    sent, reached, _ = _guard_call(headers, b'{"texts": ["a"]}')
    assert sent[0]["status"] == 400 and not reached
    assert f"{name} header sent 2 times" in json.loads(sent[1]["body"])["error"]


def test_integer_over_the_digit_limit_is_400_in_any_field():
    for body in (b'{"texts": ["a"], "n": ' + b"7" * 5000 + b"}", b'{"texts": [' + b"1" * 4301 + b"]}"):
        sent, reached, _ = _guard_call([JSON], body)
        assert sent[0]["status"] == 400 and not reached
        assert "number the service cannot read" in json.loads(sent[1]["body"])["error"]


def test_item_count_is_refused_before_the_app_sees_an_item():
    sent, reached, _ = _guard_call([JSON], json.dumps({"texts": [LONG_WORD] * 9000}).encode())
    assert sent[0]["status"] == 400 and not reached
    assert "at most 8 items" in json.loads(sent[1]["body"])["error"]
    sent, reached, _ = _guard_call([JSON], json.dumps({"texts": ["a"] * 8}).encode())
    assert sent[0]["status"] == 200 and reached


def test_unexpected_exception_is_a_fast_500_logged_once(caplog):
    async def broken(scope, receive, send):
        raise KeyError("a bug")

    with caplog.at_level(logging.ERROR, logger="l3m.serving"):
        sent, _, seconds = _guard_call([JSON], b'{"texts": ["a"]}', app=broken)
    assert sent[0]["status"] == 500 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"error": "internal server error"}
    assert seconds < 5
    records = [r for r in caplog.records if r.name == "l3m.serving"]
    assert len(records) == 1 and records[0].exc_info and "a bug" in caplog.text


# ------------------------------------------------------------------- item 5: the bound -------


def test_left_truncating_tokenizer_is_cut_to_a_suffix_that_encodes_the_same(tok):
    import copy

    from test_serving_hardening import long_texts

    left = copy.deepcopy(tok)
    left.truncation_side = "left"
    cuts = 0
    for text in long_texts(40, seed=5):
        piece, cut = bounded_text(left, text, L, None)
        assert left(piece, truncation=True, max_length=L)["input_ids"] == left(text, truncation=True, max_length=L)[
            "input_ids"]
        if cut:
            cuts += 1
            assert text.endswith(piece) and len(piece) < len(text)
    assert cuts > 15


def test_character_limit_below_the_first_probe_is_enforced(tok):
    limit = PROBE_CHARS_PER_TOKEN * L // 4  # 128 characters
    assert bounded_text(tok, "x" * limit, L, limit) == ("x" * limit, False)
    with pytest.raises(TextRejected, match=f"first {limit} do not hold"):
        bounded_text(tok, "x" * (limit + 50), L, limit)
    dots = "." * 1000  # one token per character: more than L tokens within the limit, so cut, not refused
    piece, cut = bounded_text(tok, dots, L, limit)
    assert cut and len(piece) == limit


# ------------------------------------------------------------------- item 6 ------------------


def test_cancelled_requests_are_not_computed():
    computed: list[str] = []

    def run(items):
        computed.extend(items)
        time.sleep(0.1)
        return items

    async def main():
        b = MicroBatcher(run, max_batch_texts=8, max_queue_texts=100)
        first = asyncio.ensure_future(b.submit(["first"]))
        await asyncio.sleep(0.02)  # running: the next two wait in the queue
        gone = asyncio.ensure_future(b.submit(["gone"]))
        kept = asyncio.ensure_future(b.submit(["kept"]))
        await asyncio.sleep(0)
        gone.cancel()  # e.g. the request timed out
        out = await first, await kept
        b.close()
        return out

    assert asyncio.run(main()) == (["first"], ["kept"])
    assert computed == ["first", "kept"]


def test_base_exception_from_the_model_call_answers_every_request_of_the_batch(caplog):
    def run(items):
        if "exit" in items:
            raise SystemExit(3)
        time.sleep(0.1)  # the next two requests queue meanwhile: one batch
        return items

    async def main():
        b = MicroBatcher(run, max_batch_texts=8, max_queue_texts=100)
        blocker = asyncio.ensure_future(b.submit(["warm"]))
        await asyncio.sleep(0)
        batch = [asyncio.ensure_future(b.submit(x)) for x in (["exit"], ["same batch"])]
        results = await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 5)
        after = await asyncio.wait_for(b.submit(["after"]), 5)  # the loop survived
        await blocker
        b.close()
        return results, after

    with caplog.at_level(logging.ERROR, logger="l3m.serving"):
        results, after = asyncio.run(main())
    assert all(isinstance(r, BatchFailed) and "SystemExit" in str(r) for r in results)
    assert after == ["after"]
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and "batch of 2 texts failed" in failures[0].getMessage() and failures[0].exc_info


def test_a_pid_reused_by_another_process_is_reported_as_a_death(tmp_path, caplog):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # A file left by an earlier process with this pid: same pid, earlier start time.
        (tmp_path / f"{other.pid}.pid").write_text(f"{other.pid} {time.time() - 3600}")
        with caplog.at_level(logging.ERROR, logger="l3m.serving"):
            assert register_worker(tmp_path) == [other.pid]
        # The live process's own file is not a death.
        from serving.workers import _started

        (tmp_path / f"{other.pid}.pid").write_text(f"{other.pid} {_started(other.pid)}")
        assert register_worker(tmp_path) == []
    finally:
        other.kill()
        other.wait()
        unregister_worker(tmp_path)
    assert f"pid {other.pid}" in caplog.text
