"""Greedy micro-batching with a bounded queue: what replaced BentoML's adaptive batcher.

BentoML's batcher holds requests according to running estimates (a least-squares fit of batch
duration over its last 50 batches, and their mean queue wait); slow batches skewed them into a
503 storm and a wait that fed on itself (measured in docs/serving.md, "Batching"). This one has
no estimates: one batch runs at a time, and everything that arrived meanwhile (up to
``max_batch_texts``, whole requests) is the next batch — an idle server starts a request at once,
a busy one batches exactly as much as is waiting. Only a queue over ``max_queue_texts`` texts is
refused, with ``Overloaded`` (503 + Retry-After in the service).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("l3m.serving")

# (texts, text_pairs or None) -> one result per text
BatchFn = Callable[[list[str], list[str] | None], list[Any]]


class Overloaded(RuntimeError):
    """The queue is full; the message says how much is waiting."""


@dataclass
class _Job:
    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future[list[Any]] = field(repr=False)


class MicroBatcher:
    def __init__(self, run: BatchFn, max_batch_texts: int, max_queue_texts: int) -> None:
        self.run = run
        self.max_batch_texts = max_batch_texts
        self.max_queue_texts = max_queue_texts
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_texts = 0
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        # One model call at a time, off the event loop (which keeps accepting and validating).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="l3m-batch")

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    async def submit(self, texts: list[str], pairs: list[str] | None) -> list[Any]:
        if self._queued_texts + len(texts) > self.max_queue_texts:
            raise Overloaded(f"{self._queued_texts} texts are already queued (limit {self.max_queue_texts})")
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._dispatch())
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(texts, pairs, future))
        self._queued_texts += len(texts)
        assert self._wake is not None
        self._wake.set()
        return await future

    def _take_batch(self) -> list[_Job]:
        jobs = [self._queue.popleft()]
        size = len(jobs[0].texts)
        while self._queue and size + len(self._queue[0].texts) <= self.max_batch_texts:
            jobs.append(self._queue.popleft())
            size += len(jobs[-1].texts)
        self._queued_texts -= size
        return jobs

    async def _dispatch(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs = self._take_batch()
            texts = [t for j in jobs for t in j.texts]
            pairs = None if jobs[0].pairs is None else [p for j in jobs for p in j.pairs or []]
            try:
                results = await loop.run_in_executor(self._executor, self.run, texts, pairs)
            except Exception as e:  # a bug in the model call: every request of the batch gets it
                logger.exception("batch of %d texts failed", len(texts))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                if not j.future.done():  # a cancelled request (client gone) just drops its share
                    j.future.set_result(results[start:start + len(j.texts)])
                start += len(j.texts)

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
