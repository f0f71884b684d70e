"""Hostile-input and load hardening, in-process: the bounded per-text encoding, the content
check, the request guard, the micro-batcher, the worker-death log and the one-line client-error
log. The same cases against a real server are in tests/test_serving.py."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
import time

import pytest
from conftest_serving import BASE_MODEL, build_tiny_model_dir, read_split
from pydantic import TypeAdapter, ValidationError

from serving.batcher import MicroBatcher, Overloaded
from serving.guard import ClientError, ClientErrorLogFilter, RequestGuard, check_json_object, check_media_type
from serving.schemas import texts_type
from serving.textbound import (
    PROBE_CHARS_PER_TOKEN,
    TextRejected,
    bounded_inputs,
    bounded_text,
    check_content,
    encode_inputs,
)
from serving.workers import register_worker, unregister_worker

L = 64


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BASE_MODEL))


def long_texts(n: int, seed: int = 0) -> list[str]:
    """Concatenated citation texts, some with accents, zero-width and combining characters."""
    rows = [r["text"] for r in read_split("train")]
    rng = random.Random(seed)
    out = []
    for k in range(n):
        text = " ".join(rng.choice(rows) for _ in range(rng.randint(3, 40)))
        if k % 3 == 0:
            text = text.replace("e", "é\u200b").replace(" a ", " \u0301 ")
        out.append(text)
    return out


# ------------------------------------------------------------------- bounded encoding --------


def test_prefix_cut_encodes_exactly_like_the_full_text(tok):
    cuts = 0
    for text in long_texts(150):
        prefix, cut = bounded_text(tok, text, L, None)
        full = tok(text, truncation=True, max_length=L)["input_ids"]
        assert tok(prefix, truncation=True, max_length=L)["input_ids"] == full
        if cut:
            cuts += 1
            assert len(tok(text)["input_ids"]) > L  # a cut text is truly longer than max_length
    assert cuts > 50  # the cut path was exercised, not only the short-text path


def test_a_1mib_text_is_cut_to_its_first_probe(tok):
    text = "We use the parser of Collins ( 1997 ) . " * 27_000  # ~1 MiB
    t0 = time.perf_counter()
    prefix, cut = bounded_text(tok, text, 128, 128 * 32)
    assert cut and len(prefix) == PROBE_CHARS_PER_TOKEN * 128
    assert time.perf_counter() - t0 < 0.5  # the full tokenization of this text takes seconds


def test_undecidable_long_texts_are_refused_only_under_a_limit(tok):
    for text in ("x" * 5000, "\u200b" * 5000 + " word"):  # one giant word; dropped characters
        with pytest.raises(TextRejected, match="first 4096 do not hold 128 tokens"):
            bounded_text(tok, text, 128, 4096)
        assert bounded_text(tok, text, 128, None) == (text, False)  # offline: used whole


def test_pairs_cut_one_long_side_and_keep_two_long_sides_whole(tok):
    short, long_a, long_b = "a short hypothesis", *long_texts(2, seed=3)
    long_a, long_b = long_a * 3, long_b * 3  # both well over L tokens
    texts, pairs, cut = bounded_inputs(tok, L, None, [long_a, short, long_a], [short, long_b, long_b])
    assert cut == [True, True, False]
    assert len(texts[0]) < len(long_a) and len(pairs[1]) < len(long_b)
    assert texts[2] is long_a and pairs[2] is long_b  # longest-first needs both full lengths
    for (a, b), (x, y) in zip(zip(texts, pairs, strict=True), [(long_a, short), (short, long_b), (long_a, long_b)],
                              strict=True):
        assert tok(a, b, truncation=True, max_length=L)["input_ids"] == tok(x, y, truncation=True, max_length=L)[
            "input_ids"]
    with pytest.raises(TextRejected, match="both texts of the pair"):
        bounded_inputs(tok, L, 600, [long_a], [long_b])


@pytest.mark.parametrize("text", ["\u200b\u200b", "\x00", "\u200f\u200e", "\u0301\u0302", "\ue000\ue001", "\u2060"])
def test_text_without_content_tokens_is_refused(tok, text):
    with pytest.raises(TextRejected, match="no content"):
        check_content(tok, text, L, 2048)


def test_service_encoding_requires_content_on_every_side(tok):
    rows = encode_inputs(tok, L, 2048, ["fine text", "word " * 2000], None, require_content=True)
    assert [r.truncated for r in rows] == [False, True]
    assert rows[0].features["input_ids"] == tok("fine text", truncation=True, max_length=L)["input_ids"]
    with pytest.raises(TextRejected, match="no content"):
        encode_inputs(tok, L, 2048, ["\u200b"], None, require_content=True)
    with pytest.raises(TextRejected, match="no content"):
        encode_inputs(tok, L, 2048, ["fine"], ["\x00"], require_content=True)
    assert len(encode_inputs(tok, L, 2048, ["fine"], ["also fine"], require_content=True)) == 1
    assert encode_inputs(tok, L, None, ["\u200b"], None)[0].truncated is False  # offline: no content check


def test_served_prediction_of_a_huge_text_equals_the_full_encoding(tmp_path):
    import torch

    from serving.model_io import load_classifier, predict

    model, tok, meta = load_classifier(build_tiny_model_dir(tmp_path / "m"))
    huge = "We extend the parser of Collins ( 1997 ) . " * 5000
    (served,) = predict(model, tok, meta, [huge], max_chars=meta.max_length * 32)
    with torch.inference_mode():
        logits = model(**tok(huge, truncation=True, max_length=meta.max_length, return_tensors="pt")).logits[0]
    probs = torch.softmax(logits, -1).tolist()
    assert served["truncated"] is True
    assert list(served["probabilities"].values()) == pytest.approx(probs, abs=1e-6)


# ------------------------------------------------------------------- request guard -----------


def test_media_type_must_be_json():
    check_media_type(b"application/json")
    check_media_type(b"Application/JSON; charset=utf-8")
    for header, status in ((None, 415), (b"multipart/form-data", 415), (b"text/plain", 415),
                           (b"application/x-www-form-urlencoded", 415)):
        with pytest.raises(ClientError) as e:
            check_media_type(header)
        assert e.value.status == status


@pytest.mark.parametrize(("body", "message"), [
    (b"\xff\xfe\x00garbage", "not"), (b'{"texts": [', "not valid JSON"), (b"[" * 100_000, "nested too deeply"),
    (b'["a list"]', "must be a JSON object"), (b"", "not valid JSON"),
])
def test_body_must_be_a_json_object(body, message):
    with pytest.raises(ClientError, match=message) as e:
        check_json_object(body)
    assert e.value.status == 400
    check_json_object(b'{"texts": "ok"}')


def test_stalled_upload_is_answered_408_and_closed():
    sent: list[dict] = []
    reached_app = False

    async def app(scope, receive, send):
        nonlocal reached_app
        reached_app = True

    async def receive():
        if not sent and not hasattr(receive, "once"):
            receive.once = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": b'{"texts": ', "more_body": True}
        await asyncio.sleep(3600)  # the client never sends the rest

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/classify",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}
    t0 = time.perf_counter()
    asyncio.run(RequestGuard(app, 1 << 20, body_timeout_s=0.3, max_texts=8)(scope, receive, send))
    assert time.perf_counter() - t0 < 2 and not reached_app
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert "not received within 0.3 s" in json.loads(sent[1]["body"])["error"]


# ------------------------------------------------------------------- micro-batcher -----------


def test_batcher_merges_waiting_requests_in_order_and_bounds_the_queue():
    calls: list[list[str]] = []

    def run(texts):
        calls.append(list(texts))
        time.sleep(0.05)
        return [t.upper() for t in texts]

    async def main():
        b = MicroBatcher(run, max_batch_texts=8, max_queue_texts=12)
        first = asyncio.ensure_future(b.submit(["a"]))
        await asyncio.sleep(0.01)  # the first request starts alone, at once
        rest = [asyncio.ensure_future(b.submit([f"t{i}", f"u{i}"])) for i in range(6)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="12 texts are already queued"):
            await b.submit(["one too many"])
        out = [await first] + [await r for r in rest]
        b.close()
        return out

    out = asyncio.run(main())
    assert out == [["A"]] + [[f"T{i}", f"U{i}"] for i in range(6)]
    # 1 alone, then whole requests up to 8 texts per batch: 4 requests, then the last 2.
    assert [len(c) for c in calls] == [1, 8, 4]


def test_batcher_without_batching_runs_each_request_alone_and_reports_failures():
    calls: list[int] = []

    def run(items):
        calls.append(len(items))
        if ("boom", None) in items:
            raise RuntimeError("model failed")
        return [a + (b or "") for a, b in items]

    async def main():
        b = MicroBatcher(run, max_batch_texts=1, max_queue_texts=100)
        ok = await asyncio.gather(*(b.submit([("a", "x"), ("b", "y")]) for _ in range(3)))
        with pytest.raises(RuntimeError, match="model failed"):
            await b.submit([("boom", None)])
        assert await b.submit([("after", None)]) == ["after"]  # the loop survives a failure
        b.close()
        return ok

    assert asyncio.run(main()) == [["ax", "by"]] * 3
    assert calls == [2, 2, 2, 1, 1]


# ------------------------------------------------------------------- logs --------------------


def test_dead_worker_is_reported_by_the_next_one(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / f"{gone.pid}.pid").write_text(str(gone.pid))
    with caplog.at_level(logging.ERROR, logger="l3m.serving"):
        assert register_worker(tmp_path) == [gone.pid]
    assert f"previous worker (pid {gone.pid}) of this server died" in caplog.text
    unregister_worker(tmp_path)  # a clean end leaves nothing to report
    caplog.clear()
    assert register_worker(tmp_path) == [] and "died" not in caplog.text
    unregister_worker(tmp_path)
    assert not list(tmp_path.glob("*.pid"))


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.LogRecord("bentoml._internal.server.http_app", logging.ERROR, __file__, 1,
                                 "Exception on %s [%s]", ("/classify", "POST"), sys.exc_info())


def test_client_errors_log_one_line_and_server_errors_keep_the_traceback():
    try:
        TypeAdapter(texts_type(False, 2)).validate_python([""])
    except ValidationError as e:
        client = _record(e)
    assert ClientErrorLogFilter().filter(client)
    line = logging.Formatter().format(client)
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("client error 400 on /classify: 1 validation error(s); 0: Value error, text is empty")
    server = _record(RuntimeError("bug"))
    assert ClientErrorLogFilter().filter(server)
    assert "Traceback" in logging.Formatter().format(server)


def test_bf16_probe_works_without_the_library(monkeypatch):
    """Inside a bento only serving/ exists: the dtype choice must not need l3m."""
    import torch

    from serving import cpu_probe
    from serving.model_io import serving_dtype

    monkeypatch.setitem(sys.modules, "l3m.scoring.onednn", None)  # import now fails
    with pytest.raises(ImportError):
        import l3m.scoring.onednn  # noqa: F401
    expected = "bfloat16" if cpu_probe.supports(torch.bfloat16) else "float32"
    assert serving_dtype("bfloat16", "cpu") == expected
    assert serving_dtype("float32", "cpu") == "float32"
