"""What a request body must be before BentoML parses it: bounded, timely, JSON.

BentoML picks its body parser from the content type (multipart, form, ...) and turns any error
raised inside its endpoint into a 500, so the checks a client can fail are made here, in an ASGI
middleware, each answered with its own 4xx and one log line (issue #17):

* 413 for bodies over ``max_bytes`` (declared by Content-Length or streamed);
* 415 for a content type other than ``application/json`` (or none);
* 408 for a body not fully received within ``body_timeout_s`` (a stalled upload would otherwise
  hold its connection open), and the connection is closed;
* 400 for bytes that are not a JSON object (undecodable, malformed, too deeply nested, an
  integer over Python's 4,300-digit conversion limit), for more than ``max_texts`` items (before
  any per-item work), and for a repeated Content-Type, Content-Length or Transfer-Encoding
  header (the guard and BentoML would each read a different one; issue #24);
* 500, at once and logged once with its traceback, for any exception the app raises before it
  has started its response (an unexpected error must not hold the connection until a timeout).

The body is buffered (bounded by ``max_bytes``) and replayed to the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("l3m.serving")

JSON_MEDIA_TYPE = "application/json"
# Headers that decide how the body is framed or parsed: exactly one of each, or none.
SINGLE_HEADERS = (b"content-type", b"content-length", b"transfer-encoding")


class ClientError(Exception):
    """A request refused before it reaches the service: status and message for the client."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


class RequestGuard:
    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float, max_texts: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.max_texts = max_texts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self._guarded(scope, receive, tracked)
        except Exception:
            logger.exception("500 on %s %s: unexpected error", scope["method"], scope["path"])
            if not started:
                await _reply(send, ClientError(500, "internal server error", close=True))

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._checked_body(scope, receive)
        except ClientError as e:
            logger.warning("client error %d on %s %s: %s", e.status, scope["method"], scope["path"], e.message)
            await _reply(send, e)
            return
        if body is None:  # the client went away while sending
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for disconnect like a real stream

        await self.app(scope, replay, send)

    async def _checked_body(self, scope: Scope, receive: Receive) -> bytes | None:
        check_single_headers(scope["headers"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise ClientError(413, f"request body larger than {self.max_bytes} bytes")
        check_media_type(headers.get(b"content-type"))
        body = await self._read(receive)
        if body is not None:
            check_item_count(check_json_object(body), self.max_texts)
        return body

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise ClientError(408, f"request body not received within {self.body_timeout_s:g} s",
                                  close=True) from None
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise ClientError(413, f"request body larger than {self.max_bytes} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


def check_media_type(header: bytes | None) -> None:
    """415 unless the content type is application/json (parameters such as charset allowed)."""
    if header is None:
        raise ClientError(415, f"no content-type header; send {JSON_MEDIA_TYPE}")
    media = header.decode("latin-1").split(";")[0].strip().lower()
    if media != JSON_MEDIA_TYPE:
        raise ClientError(415, f"content-type {media!r} is not supported; send {JSON_MEDIA_TYPE}")


def check_single_headers(headers: list[tuple[bytes, bytes]]) -> None:
    """400 for a repeated framing/parsing header: two Content-Types were read differently by
    this guard (the last) and BentoML (the first), which let a multipart body through."""
    for name in SINGLE_HEADERS:
        count = sum(1 for key, _ in headers if key.lower() == name)
        if count > 1:
            raise ClientError(400, f"{name.decode()} header sent {count} times; send it once", close=True)


def check_json_object(body: bytes) -> dict[str, Any]:
    """400 unless ``body`` is a JSON object; the field checks are the schema's (serving.schemas)."""
    try:
        value = json.loads(body)
    except UnicodeDecodeError as e:
        raise ClientError(400, f"body is not UTF-8 text: byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ClientError(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ClientError(400, "body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # int() of a number over sys.get_int_max_str_digits() digits
        raise ClientError(400, f"body has a number the service cannot read: {str(e)[:120]}") from None
    if not isinstance(value, dict):
        raise ClientError(400, f"body must be a JSON object with a 'texts' field, not {type(value).__name__}")
    return value


def check_item_count(value: dict[str, Any], max_texts: int) -> None:
    """400 for more than ``max_texts`` items, before anything looks at one of them."""
    texts = value.get("texts")
    if isinstance(texts, list) and len(texts) > max_texts:
        raise ClientError(400, f"texts: List should have at most {max_texts} items after validation, "
                          f"not {len(texts)}")


async def _reply(send: Send, error: ClientError) -> None:
    payload = json.dumps({"error": error.message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if error.close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs every request it answers 4xx with a full traceback (~2 KB per bad request):
    keep such records, but as one line naming the error; 5xx tracebacks are left whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = _client_status(exc)
        if exc is None or status is None:
            return True
        path = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "client error %d on %s: %s"
        record.args = (status, path, _one_line(exc))
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _client_status(exc: BaseException | None) -> int | None:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, BentoMLException) and int(exc.error_code.value) < 500:
        return int(exc.error_code.value)
    return None


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        where = ".".join(str(x) for x in first["loc"])
        return f"{exc.error_count()} validation error(s); {where}: {first['msg']}"[:300]
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def install_client_error_log_filter() -> None:
    """On the logger BentoML's endpoint wrapper reports request errors with (log_exception)."""
    target = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, ClientErrorLogFilter) for f in target.filters):
        target.addFilter(ClientErrorLogFilter())


def error_response(ctx: Any, status: int, message: str, retry_after: int | None, **extra: Any) -> Any:
    """A JSON error from a BentoML API: ``{"error": message, **extra}``."""
    # BentoML sends a returned Response as is (the declared type documents the 200), except
    # that an API taking ``ctx`` gets the status code of ``ctx.response``.
    from starlette.responses import JSONResponse

    ctx.response.status_code = status
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


async def answered(ctx: Any, client: str, work: Awaitable[list[dict[str, Any]]]) -> Any:
    """The predictions ``work`` computes as ``Prediction`` objects, or the error response for what
    it raised: a ``Refused`` its 4xx, ``Overloaded`` 503 + Retry-After, anything else 500."""
    from serving.batcher import BatchFailed, Overloaded
    from serving.preflight import Refused
    from serving.schemas import Prediction

    try:
        preds = await work
    except Refused as e:
        logger.warning("client error %d on /classify from %s: %s", e.status, client, e.message)
        return error_response(ctx, e.status, e.message, e.retry_after)
    except Overloaded as e:
        logger.warning("503 overloaded: %s", e)
        return error_response(ctx, 503, f"overloaded: {e}; retry later", 1)
    except Exception as e:  # a bug: logged once with its traceback (per batch), a 500 at once
        if not isinstance(e, BatchFailed):
            logger.exception("500 on /classify: unexpected error")
        return error_response(ctx, 500, "internal server error", None)
    return [Prediction(**p) for p in preds]
