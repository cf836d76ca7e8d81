"""Server-side batching: the frames of concurrent requests predicted together, behind a bounded queue.

Requests hand their frames to :meth:`Batcher.predict` and wait; one model thread takes the waiting requests in
arrival order, as many as fit in ``max_batch`` frames (a request is never split between batches, one larger than
``max_batch`` goes alone, in passes of ``max_batch``), after waiting at most ``max_wait`` seconds for a batch to
fill, and predicts them in one pass. At most ``max_queue`` frames wait: a request that would pass that bound is
refused at once (:class:`QueueFull`: HTTP 503 with ``Retry-After``) rather than queued behind an unbounded backlog.
:meth:`Batcher.close` predicts what is waiting and then stops the thread (a server draining on SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

BATCH_WAIT_S = 0.005
"""How long the model thread waits for more requests to fill a batch, once one is waiting."""


class QueueFull(Exception):
    """The queue holds ``max_queue`` frames, or the frames in flight hold the most pixels: the request is refused (the
    client should retry later)."""


class Closed(Exception):
    """The batcher is stopping: no request is taken any more."""


@dataclass
class _Job:
    frames: Sequence[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    """Predicts the frames of concurrent requests in shared batches on one model thread.

    Args:
        predict: Predicts a batch of frames, returning one answer per frame in order.
        max_batch: The most frames predicted in one pass.
        max_queue: The most frames waiting to be predicted.
        max_wait: Seconds the model thread waits for a batch to fill once a request is waiting.
    """

    def __init__(self, predict: Callable[[list], list], max_batch: int, max_queue: int, max_wait: float = BATCH_WAIT_S) -> None:
        self._predict = predict
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait = max_wait
        self._condition = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._queued = 0
        self._closing = False
        self.batches = 0
        self._thread = threading.Thread(target=self._work, name="medseg-model", daemon=True)

    def start(self) -> None:
        """Start the model thread."""
        self._thread.start()

    @property
    def queued(self) -> int:
        """Frames waiting to be predicted (not those in the batch being predicted)."""
        return self._queued

    async def predict(self, frames: Sequence[Any]) -> list:
        """The answers for a request's frames, once a batch holding them is predicted.

        Raises:
            QueueFull: If the queue cannot take the frames now.
            Closed: If the batcher is stopping.
            Exception: Whatever the prediction of the batch raised.
        """
        loop = asyncio.get_running_loop()
        job = _Job(list(frames), loop.create_future(), loop)
        with self._condition:
            if self._closing:
                raise Closed("the server is stopping")
            if self._queued + len(job.frames) > self.max_queue:
                raise QueueFull(f"{self._queued} frames are waiting, the most is {self.max_queue}")
            self._waiting.append(job)
            self._queued += len(job.frames)
            self._condition.notify()
        return await job.future

    def close(self) -> None:
        """Predict the requests waiting, then stop the model thread and wait for it."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _work(self) -> None:
        while (jobs := self._next_jobs()) is not None:
            jobs = [job for job in jobs if not job.future.done()]  # a client gone (cancelled) is not predicted
            if not jobs:
                continue
            try:
                answers = self._passes([frame for job in jobs for frame in job.frames])
            except Exception as error:  # noqa: BLE001 - handed to the requests, the thread goes on
                self._alone(jobs, error)
                continue
            start = 0
            for job in jobs:
                _hand(job, answers[start : start + len(job.frames)], None)
                start += len(job.frames)

    def _passes(self, frames: list) -> list:
        """The answers of frames, in passes of at most ``max_batch``."""
        self.batches += 1
        return [
            answer for start in range(0, len(frames), self.max_batch) for answer in self._predict(frames[start : start + self.max_batch])
        ]

    def _alone(self, jobs: list[_Job], error: Exception) -> None:
        """After a failed batch, each request predicted alone: only the one whose frames fail gets the error."""
        if len(jobs) == 1:
            _hand(jobs[0], None, error)
            return
        for job in jobs:
            try:
                _hand(job, self._passes(list(job.frames)), None)
            except Exception as own:  # noqa: BLE001 - this request's own failure, handed to it
                _hand(job, None, own)

    def _next_jobs(self) -> list[_Job] | None:
        """The requests of the next batch, after a short wait for it to fill; ``None`` once closed and drained."""
        with self._condition:
            while not self._waiting and not self._closing:
                self._condition.wait()
            if not self._waiting:
                return None
            deadline = time.monotonic() + self.max_wait
            while self._queued < self.max_batch and not self._closing and (left := deadline - time.monotonic()) > 0:
                self._condition.wait(left)
            jobs = [self._waiting.popleft()]
            taken = len(jobs[0].frames)
            while self._waiting and taken + len(self._waiting[0].frames) <= self.max_batch:
                jobs.append(self._waiting.popleft())
                taken += len(jobs[-1].frames)
            self._queued -= taken
            return jobs


def _hand(job: _Job, result: list | None, error: Exception | None) -> None:
    """Hand a request its answers or error on its event loop (nothing when that loop has closed: the server stopped)."""
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future, result: list | None, error: Exception | None) -> None:
    """Give a request its answers or the batch's error, unless it stopped waiting (the client went away)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class PixelBudget:
    """The pixels of the frames a server holds at once, from decoding to the answer, bounded (memory scales with them).

    A request reserves its frames' pixels, as their headers declare them, before they are decoded, and releases them
    once answered; a request that does not fit now is refused (:class:`QueueFull`) rather than decoded (a request
    larger than the whole budget is refused before, for good). Used on the event loop's thread only.

    Args:
        limit: The most pixels held at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def reserved(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` for the block.

        Raises:
            QueueFull: If other requests hold too many pixels for these to fit.
        """
        if self.held + pixels > self.limit:
            raise QueueFull(f"the frames in flight hold {self.held:,} pixels, the most is {self.limit:,}")
        self.held += pixels
        try:
            yield
        finally:
            self.held -= pixels
