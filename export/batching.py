"""Micro-batching: concurrent requests gathered into one model call, off the event loop.

Each request hands its images (an ``(n, C, H, W)`` float32 array) to
:meth:`MicroBatcher.submit` and awaits its rows. One collector task takes the first
waiting request, then more until ``max_batch`` images are gathered or ``max_wait``
seconds have passed since the first, runs the model once on all of them in a worker
thread, and hands each request its rows. While the model runs, new requests queue
up and form the next batch, so under load batches fill without waiting. No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ressl.errors import ConfigError

__all__ = ["MicroBatcher"]


class MicroBatcher:
    """Gather requests into batches of up to ``max_batch`` images for ``run``.

    Args:
        run: float32 ``(N, C, H, W)`` -> float32 ``(N, D)``; called in one worker thread,
            one batch at a time.
        max_batch: Images per call (a single larger request is run whole).
        max_wait: Seconds the first request of a batch waits for others.
    """

    def __init__(
        self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait: float
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ConfigError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ressl-model")
        self.batches = 0  # model calls so far
        self.batched_images = 0
        self._arriving = 0  # requests announced but not yet submitted
        # Set when a request is queued or one on the way gives up (its decode failed): a batch
        # being gathered waits on this, never on the queue alone, which would hold the batch
        # until its deadline for a request that will never come.
        self._changed = asyncio.Event()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request that will submit soon (while it decodes): a batch waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._changed.set()

    async def start(self) -> None:
        """Start collecting (in the running event loop)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        """Finish the batches already queued, then stop."""
        if self._queue is not None:
            await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """The model's rows for ``images``, computed in some batch."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        done: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((images, done))
        self._changed.set()
        return await done

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            count, deadline = len(items[0][0]), loop.time() + self.max_wait
            while count < self.max_batch:
                if not self._queue.empty():
                    items.append(self._queue.get_nowait())
                    count += len(items[-1][0])
                    continue
                left = deadline - loop.time()
                if left <= 0 or not self._arriving:  # no one else is on the way
                    break
                self._changed.clear()  # (no await since the checks above: nothing is missed)
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    break
            await self._run(loop, items)

    async def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        items: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]],
    ) -> None:
        assert self._queue is not None
        try:
            batch = items[0][0] if len(items) == 1 else np.concatenate([i for i, _ in items])
            rows = await loop.run_in_executor(self._pool, self.run, batch)
        except Exception as e:  # noqa: BLE001 - handed to every request of the batch
            for _, done in items:
                if not done.done():
                    done.set_exception(e)
        else:
            self.batches += 1
            self.batched_images += len(batch)
            start = 0
            for images, done in items:
                if not done.done():  # (a request whose client went away)
                    done.set_result(rows[start : start + len(images)])
                start += len(images)
        finally:
            for _ in items:
                self._queue.task_done()
