"""Greedy micro-batching with a bounded queue: what replaced BentoML's adaptive batcher.

BentoML's batcher holds requests according to running estimates (a least-squares fit of batch
duration over its last 50 batches, and their mean queue wait); slow batches skewed them into a
503 storm and a wait that fed on itself (measured in docs/serving.md, "Batching"). This one has
no estimates: one batch runs at a time, and everything that arrived meanwhile (up to
``max_batch_texts``, whole requests) is the next batch — an idle server starts a request at once,
a busy one batches exactly as much as is waiting. Only a queue over ``max_queue_texts`` texts is
refused, with ``Overloaded`` (503 + Retry-After in the service).

Keys (a multi-domain service submits each request with its domain): a batch holds one key's
requests only (one model runs it), and the keys with waiting requests take turns, one batch
each, so a key with a deep queue cannot starve the others. Admission is fair too: when the
queue is full, only a key already holding more than its share (``max_queue_texts`` / keys
waiting) is refused, so the queue holds at most about twice ``max_queue_texts``. Without keys
(one domain) it is the single queue described above.

A request cancelled while it waits (its client went away, or the request timed out) is dropped
from the queue instead of being computed; whatever the model call raises, every request of its
batch is answered, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("l3m.serving")

# the items of a batch (the service's: encoded texts) -> one result per item
BatchFn = Callable[[list[Any]], list[Any]]


class Overloaded(RuntimeError):
    """The queue is full; the message says how much is waiting."""


class BatchFailed(RuntimeError):
    """The model call of a request's batch raised; already logged with its traceback, once per
    batch (the cause is ``__cause__``)."""


@dataclass
class _Job:
    items: list[Any]
    future: asyncio.Future[list[Any]] = field(repr=False)
    key: Hashable = None


class MicroBatcher:
    def __init__(self, run: BatchFn, max_batch_texts: int, max_queue_texts: int) -> None:
        self.run = run
        self.max_batch_texts = max_batch_texts
        self.max_queue_texts = max_queue_texts
        self._queues: dict[Hashable, collections.deque[_Job]] = {}
        self._turns: collections.deque[Hashable] = collections.deque()  # keys with waiting jobs, next first
        self._queued_texts = 0
        self._queued_by_key: collections.Counter[Hashable] = collections.Counter()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        # One model call at a time, off the event loop (which keeps accepting and validating).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="l3m-batch")

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    async def submit(self, items: list[Any], key: Hashable = None) -> list[Any]:
        """The results of ``items``, computed in a batch with other requests of the same ``key``."""
        self._admit(key, len(items))
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._dispatch())
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if key not in self._queues:
            self._queues[key] = collections.deque()
            self._turns.append(key)
        self._queues[key].append(_Job(items, future, key))
        self._queued_texts += len(items)
        self._queued_by_key[key] += len(items)
        assert self._wake is not None
        self._wake.set()
        return await future

    def _admit(self, key: Hashable, n: int) -> None:
        if self._queued_texts + n <= self.max_queue_texts:
            return
        share = self.max_queue_texts // max(1, len(self._queues | {key: None}))
        if self._queued_by_key[key] + n > share:
            raise Overloaded(f"{self._queued_texts} texts are already queued (limit {self.max_queue_texts}"
                             + (f"; {self._queued_by_key[key]} of them for {key!r}, its share {share})" if key is not None
                                else ")"))

    def _take_batch(self) -> list[_Job]:
        """The next batch: the next key's whole requests, in order, up to max_batch_texts;
        cancelled ones dropped. The key goes to the back of the turns if it has more."""
        key = self._turns.popleft()
        queue = self._queues[key]
        jobs: list[_Job] = []
        size = 0
        while queue and (not jobs or size + len(queue[0].items) <= self.max_batch_texts):
            job = queue.popleft()
            self._queued_texts -= len(job.items)
            self._queued_by_key[key] -= len(job.items)
            if not job.future.done():
                jobs.append(job)
                size += len(job.items)
        if queue:
            self._turns.append(key)
        else:
            del self._queues[key], self._queued_by_key[key]
        return jobs

    async def _dispatch(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._turns:
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs = self._take_batch()
            if not jobs:
                continue
            items = [x for j in jobs for x in j.items]
            try:
                results = await loop.run_in_executor(self._executor, self.run, items)
            except BaseException as e:  # noqa: BLE001  (every kind must answer the batch's requests)
                self._fail(jobs, e)
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this loop itself is being cancelled (close)
                continue
            start = 0
            for j in jobs:
                if not j.future.done():  # a request cancelled meanwhile just drops its share
                    j.future.set_result(results[start:start + len(j.items)])
                start += len(j.items)

    @staticmethod
    def _fail(jobs: list[_Job], e: BaseException) -> None:
        """A model call that raised (a bug, or a BaseException such as SystemExit from a
        library): log it once and give every request of the batch an error, never a hang."""
        if isinstance(e, asyncio.CancelledError):
            for j in jobs:
                j.future.cancel()
            return
        n = sum(len(j.items) for j in jobs)
        logger.error("batch of %d texts failed", n, exc_info=e)
        for j in jobs:
            if not j.future.done():
                error = BatchFailed(f"the model call of a batch of {n} texts raised {e!r}")
                error.__cause__ = e
                j.future.set_exception(error)

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
