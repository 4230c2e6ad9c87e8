"""Group commit: requests that arrive while a batch is being written are written together in
the next one.

A route awaits ``GroupCommit.submit(item)``. Items queue on the event loop; a drainer takes
everything queued (up to ``max_batch``), runs the batch function on the threadpool, and hands
each caller its own answer. Under load a batch holds whatever arrived during the previous
one, so the per-transaction costs (a connection checkout, the round trips, a lock, the
COMMIT) are shared; an idle service writes each item at once, adding no wait.

The batch function answers one result per item, in order: a value, or an exception for that
item alone. If it raises, every item of the batch gets that exception."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(self, run_batch: Callable[[list[T]], Sequence[R | Exception]], *,
                 max_batch: int = 64, concurrency: int = 1) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._drainers: set[asyncio.Task[None]] = set()
        self.batches = 0  # written so far, and the items in them: for tests and metrics
        self.items = 0

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if len(self._drainers) < self.concurrency:
            task = asyncio.create_task(self._drain())
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)
        # A caller that goes away (the client disconnected) cancels only its wait: the item
        # stays in its batch and is written, as it would have been by a synchronous route.
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
            try:
                results = await run_in_threadpool(self._run_batch, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function answered {len(results)} results "
                                       f"for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                results = [exc] * len(batch)
            self.batches += 1
            self.items += len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
