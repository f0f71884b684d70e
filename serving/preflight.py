"""Admission of a /classify request: its tokenizer work, bounded, fair by size, off the event loop.

The tokenizer's cost per character depends on the text: WordPiece is quadratic in a word's
length (up to 100 characters), so a request of long "words" costs about ten times what natural
text of the same size does (issue #24: 8 s of event-loop time for one 981 KB request). The
request's items are therefore encoded here, once, before it joins a batch:

* in worker threads, never on the event loop, which keeps answering /livez and cheap requests;
* in two lanes chosen by an upper bound known before any tokenizer work (the characters the
  tokenizer may read: each text counted up to ``max_chars``): *light* requests (up to
  ``light_chars``) are never shed; *heavy* ones share one thread, at most ``heavy_queue`` of
  them waiting or running, and each client may spend ``heavy_share`` CPU-seconds per second
  there on average, after a burst of one request's budget (a debt repaid over time); a client
  over its share, or a full lane, is answered 429 + Retry-After;
* the heavy lane's thread runs at a lower scheduling priority (``HEAVY_NICE``), so when the
  cores are contended the model's thread and the event loop, which serve everyone, go first;
* with a CPU budget per request (the lane thread's CPU time, which other processes on the
  host do not inflate): once exceeded between two items, the request is answered 413.

The encoded rows go to the batcher, so the model's thread only pads and runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from serving.textbound import Encoded, TextRejected

logger = logging.getLogger("l3m.serving")

# (text, text_pair or None) -> its encoding; raises TextRejected with the client's message.
Encoder = Callable[[str, str | None], Encoded]


# Linux applies nice values per thread: +10 gives this thread a small share of a busy core.
HEAVY_NICE = 10


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HEAVY_NICE)
    except (AttributeError, OSError):  # not Linux / not permitted: the lane still works, unprioritised
        logger.info("could not lower the heavy preflight lane's priority")


class Refused(Exception):
    """A request the service will not run: status, message and Retry-After (seconds) if any."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Limits:
    cpu_budget_s: float  # tokenizer CPU time per request (413 beyond)
    light_chars: int  # requests bounded by this many characters take the light lane
    heavy_share: float  # CPU-seconds per second of heavy-lane work per client (429 beyond)
    heavy_queue: int  # heavy requests waiting or running (429 beyond)


@dataclass
class _Work:
    """One request's items on their way through a lane; ``spent``: the lane's CPU time so far."""

    texts: list[str]
    pairs: list[str] | None
    spent: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)


class Preflight:
    def __init__(self, make_encoder: Callable[[], Encoder], max_chars: int, limits: Limits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_chars = max_chars
        self.limits = limits
        self._clock = clock
        # One encoder per lane: a fast tokenizer used from two threads at once can fail.
        self._lanes = {name: (ThreadPoolExecutor(1, thread_name_prefix=f"l3m-{name}", initializer=init),
                              make_encoder())
                       for name, init in (("light", None), ("heavy", _lower_priority))}
        self._heavy_pending = 0
        self._debt: dict[str, tuple[float, float]] = {}  # client -> (CPU-seconds owed, as of when)

    def size(self, texts: list[str], pairs: list[str] | None) -> int:
        """Characters the tokenizer may read for this request (each text up to max_chars)."""
        sides = texts if pairs is None else texts + pairs
        return sum(min(len(t), self.max_chars) for t in sides)

    async def encode(self, client: str, texts: list[str], pairs: list[str] | None) -> list[Encoded]:
        """The request's encoded items, or ``Refused`` (400 bad item, 413 over budget, 429 shed)."""
        work = _Work(texts, pairs)
        if self.size(texts, pairs) <= self.limits.light_chars:
            return await self._run("light", work)
        self._admit_heavy(client)
        self._heavy_pending += 1
        try:
            return await self._run("heavy", work)
        finally:
            self._heavy_pending -= 1
            self._charge(client, work.spent)

    async def _run(self, lane: str, work: _Work) -> list[Encoded]:
        executor, encoder = self._lanes[lane]
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, self._encode_all, encoder, work)
        except asyncio.CancelledError:
            work.cancelled.set()  # the client is gone or timed out: the lane stops at the next item
            raise

    def _admit_heavy(self, client: str) -> None:
        owed = self._owed(client)
        if owed > self.limits.cpu_budget_s:  # the burst: one request's budget
            wait = math.ceil((owed - self.limits.cpu_budget_s) / self.limits.heavy_share)
            raise Refused(429, f"too much expensive tokenizer work from this client recently; retry in {wait} s "
                          f"or send fewer, shorter texts", retry_after=wait)
        if self._heavy_pending >= self.limits.heavy_queue:
            raise Refused(429, f"{self._heavy_pending} large requests are already being prepared; retry later "
                          "or send fewer, shorter texts", retry_after=1)

    def _owed(self, client: str) -> float:
        owed, since = self._debt.get(client, (0.0, 0.0))
        now = self._clock()
        owed = max(0.0, owed - self.limits.heavy_share * (now - since))
        if owed == 0.0:
            self._debt.pop(client, None)  # repaid: forget the client (the table stays small)
        else:
            self._debt[client] = (owed, now)
        return owed

    def _charge(self, client: str, cpu_s: float) -> None:
        self._debt[client] = (self._owed(client) + cpu_s, self._clock())

    def _encode_all(self, encoder: Encoder, work: _Work) -> list[Encoded]:
        """In a lane thread: every item, until the CPU budget runs out or the request is
        cancelled (checked between items, so one item's work is the most either can overrun)."""
        start = time.thread_time()
        rows: list[Encoded] = []
        for i, text in enumerate(work.texts):
            work.spent = time.thread_time() - start
            if work.cancelled.is_set():  # nobody waits for the answer any more
                raise Refused(499, "request cancelled while its texts were encoded")
            if work.spent > self.limits.cpu_budget_s:
                raise Refused(413, f"the texts need more tokenizer work than one request may take "
                              f"({self.limits.cpu_budget_s:g} s of CPU, spent after {i} of {len(work.texts)} "
                              "items): send fewer or shorter texts per request, or texts with shorter words")
            try:
                rows.append(encoder(text, None if work.pairs is None else work.pairs[i]))
            except TextRejected as e:
                work.spent = time.thread_time() - start
                raise Refused(400, f"texts.{i}: {e}") from None
        work.spent = time.thread_time() - start
        return rows

    def close(self) -> None:
        for executor, _ in self._lanes.values():
            executor.shutdown(wait=False, cancel_futures=True)
