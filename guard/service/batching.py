"""Micro-batching: concurrent requests scored together in one call on one worker thread.

The service takes its batcher from a ``BatcherFactory``: ``MicroBatcher`` in one process (``memguard serve``),
Ray Serve's ``serve.batch`` in each replica of ``memguard serve --engine ray`` (``guard.service.ray_serve``);
both keep a request whole and run ``fn`` on the guard's one worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

__all__ = ["Batcher", "BatcherFactory", "MicroBatcher"]


class Batcher(Protocol[Item, Result]):
    """What the service's ``/v1/check`` awaits: ``submit`` one request, get its result from a batched call."""

    batches: int  # calls of the batched function so far, for metrics and tests

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, item: Item) -> Result: ...


class BatcherFactory(Protocol):
    """Makes the batcher of one guard: ``fn`` judges a list of requests in ``executor`` (the guard's worker thread);
    at most ``max_batch`` prompts (``size`` of each request) per call, waiting at most ``max_wait_ms`` for company."""

    def __call__(self, fn: Callable[[list], Sequence], executor: concurrent.futures.Executor, *, max_batch: int,
                 max_wait_ms: float, size: Callable[[object], int]) -> Batcher: ...


class MicroBatcher(Generic[Item, Result]):
    """Collects requests from concurrent callers for up to ``max_wait_ms`` (or ``max_batch`` prompts)
    and runs ``fn`` once on all of them in ``executor``, so the scorer sees one batched model call
    instead of many small ones. ``fn`` gets the requests and returns one result per request, in order;
    ``size`` tells how many prompts a request holds.

    A request is never split: one with more than ``max_batch`` prompts runs alone.
    """

    def __init__(
        self,
        fn: Callable[[list[Item]], Sequence[Result]],
        executor: concurrent.futures.Executor,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 10.0,
        size: Callable[[Item], int] = len,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._fn = fn
        self._size = size
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # calls of fn, for metrics and tests

    def start(self) -> None:
        """Start the collecting task on the running loop (again, if the loop changed)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._queue = asyncio.Queue()
        self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, item: Item) -> Result:
        """The result for ``item``, computed in some batch together with other callers' requests."""
        self.start()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = [await queue.get()]
            size = self._size(batch[0][0])
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                if size + self._size(item[0]) > self.max_batch:
                    await self._execute(batch, loop)  # keep requests whole: the newcomer opens the next batch
                    batch, size, deadline = [], 0, loop.time() + self.max_wait
                batch.append(item)
                size += self._size(item[0])
            await self._execute(batch, loop)

    async def _execute(self, batch: list[tuple[Item, asyncio.Future]], loop: asyncio.AbstractEventLoop) -> None:
        items = [item for item, _ in batch]
        self.batches += 1
        try:
            results = await loop.run_in_executor(self._executor, self._fn, items)
            if len(results) != len(items):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(items)} requests")
        except Exception as error:  # every waiting request learns of the failure; none is left hanging
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
