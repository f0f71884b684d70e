"""Connection limits that neither BentoML nor uvicorn offers: a header deadline and a cap.

BentoML's HTTP worker runs uvicorn (h11 protocol here) with ``timeout_keep_alive`` (5 s; ``bentoml
serve --timeout-keep-alive``), which closes a connection left idle *after a response*, and
h11's 16 KiB limit on an incomplete request head. But uvicorn arms no timer before a
connection's first request, and the keep-alive timer is cancelled by the first byte of the
next one, so a connection that sends nothing, or its headers a byte at a time, stays open
forever (issue #24: 350 of them after 60 s). uvicorn's ``limit_concurrency`` would answer 503
per request, to everyone, and BentoML's worker does not pass it anyway.

``GuardedH11Protocol`` is uvicorn's h11 protocol plus:

* a deadline for each request head: ``header_timeout_s`` from the connection's start, or from
  the end of the previous response; a connection still without a complete head then is
  closed (with a 408 if part of a head had arrived);
* a cap on open connections: past ``max_connections`` in all, or ``max_per_client`` from one
  client address, a new connection is answered 503 (429 for one client) and closed at once;
* 400 for a head that repeats Content-Type, Content-Length or Transfer-Encoding: h11 merges
  equal Content-Length values (as RFC 9110 allows) before the app could see the repetition
  (``serving.guard`` checks the others for any ASGI server).

``install`` makes it the protocol of uvicorn's default ``http="auto"`` setting, which is what
BentoML's worker uses; it must run in the worker before uvicorn's config is loaded, i.e. at the
service module's import.
"""

from __future__ import annotations

import asyncio
import json
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.guard import SINGLE_HEADERS

PROTOCOL_PATH = "serving.connections:GuardedH11Protocol"
MAX_HEAD_BYTES = 64 * 1024


def raw_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def repeated_header(head: bytes) -> str | None:
    """The first of SINGLE_HEADERS that a raw request head (without its blank line) repeats."""
    names = [line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")[1:] if b":" in line]
    return next((n.decode() for n in SINGLE_HEADERS if names.count(n) > 1), None)


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 512
    max_per_client: ClassVar[int] = 256

    _head_deadline: asyncio.TimerHandle | None = None
    _head: bytes = b""  # the bytes of a request head not complete yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if len(self.connections) > self.max_connections:
            self._refuse(503, "Service Unavailable", f"over {self.max_connections} open connections; retry later")
        elif host is not None and self._open_from(host) > self.max_per_client:
            self._refuse(429, "Too Many Requests",
                         f"over {self.max_per_client} open connections from this client; reuse or close some")
        else:
            self._arm_head_deadline()

    def _open_from(self, host: str) -> int:
        peers = (getattr(c, "client", None) for c in self.connections)
        return sum(1 for peer in peers if peer is not None and peer[0] == host)

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self.logger.warning("connection from %s refused with %d: %s", self.client, status, message)
        self.transport.write(raw_response(status, reason, message))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and not self._request_running():
            self._head = (self._head + data)[:MAX_HEAD_BYTES]  # h11 refuses longer heads itself
            end = self._head.find(b"\r\n\r\n")
            if end >= 0:
                repeated = repeated_header(self._head[:end])
                self._head = b""
                if repeated is not None:
                    self._refuse(400, "Bad Request", f"{repeated} header sent more than once; send it once")
                    return
        super().data_received(data)
        if self._request_running():
            self._disarm_head_deadline()  # the head is complete: the body has its own timeout (guard)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._request_running():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _request_running(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self._request_running():
            return
        partial = bool(self.conn.trailing_data[0])  # bytes of a head h11 is still waiting to complete
        self.logger.info("closing connection from %s: no complete request head within %g s",
                         self.client, self.header_timeout_s)
        if partial:
            self.transport.write(raw_response(408, "Request Timeout",
                                              f"request head not received within {self.header_timeout_s:g} s"))
        self.transport.close()


def install(header_timeout_s: float, max_connections: int, max_per_client: int) -> None:
    """Use ``GuardedH11Protocol`` with these limits for uvicorn's ``http="auto"`` setting."""
    from uvicorn import config

    GuardedH11Protocol.header_timeout_s = header_timeout_s
    GuardedH11Protocol.max_connections = max_connections
    GuardedH11Protocol.max_per_client = max_per_client
    config.HTTP_PROTOCOLS["auto"] = PROTOCOL_PATH

