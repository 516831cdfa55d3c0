"""What requests hand to the engine and what comes back: jobs, results, and the channel to the event loop.

A `GenerationJob` is one generation request: its prompt, sampling, monitor and hold-back window; the engine
fills its private fields while it runs. A `CallJob` is any function that needs the model (shadow scoring).
Results reach the request's event loop through its `Channel` as `Chunk`s of text, then `Done` (or `Failed`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from monitor.generate import SamplingParams
from monitor.monitoring import RequestMonitor


class QueueFull(RuntimeError):
    """No room in the request queue; retry later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new work."""


# ---- what flows back to the request --------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    text: str


@dataclass(frozen=True)
class Done:
    result: JobResult


@dataclass(frozen=True)
class Failed:
    error: str
    status: int = 500  # for the client: 502 when a proxied upstream failed
    result: JobResult | None = None  # what happened before the failure (proxy mode), recorded


class Channel:
    """Engine thread -> asyncio: items are delivered on the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Chunk | Done | Failed] = asyncio.Queue()

    def put(self, item: Chunk | Done | Failed) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> Chunk | Done | Failed:
        return await self.queue.get()


@dataclass
class JobResult:
    finish_reason: str  # stop | length | content_filter | cancelled | timeout | shutdown
    text: str  # what was sent to the client
    prompt_tokens: int
    completion_tokens: int  # tokens whose text was sent
    monitor: RequestMonitor | None
    queued_s: float
    first_token_s: float | None  # from submission to the first emitted text
    total_s: float
    batch_size: int
    prefill_s: float | None = None  # from the batch's start to the end of its prefill pass
    monitor_s: float = 0.0  # time this request's monitor spent scoring (detectors + policy)
    policy_s: float = 0.0  # of which in policy evaluation

    def timings(self) -> dict[str, float | None]:
        """Seconds (and the batch size) for the decision event: spans and metrics are built from them."""
        return {
            "queued_s": self.queued_s,
            "prefill_s": self.prefill_s,
            "first_token_s": self.first_token_s,
            "total_s": self.total_s,
            "monitor_s": self.monitor_s,
            "policy_s": self.policy_s,
            "batch_size": float(self.batch_size),
        }


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    params: SamplingParams
    channel: Channel
    monitor: RequestMonitor | None = None
    hold_back: int = 0
    deadline: float | None = None  # time.monotonic() after which the job stops with `timeout`
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    # filled by the engine
    _held: deque[str] = field(default_factory=deque, init=False)
    _sent: list[str] = field(default_factory=list, init=False)
    _first: float | None = field(default=None, init=False)
    _stopped: str | None = field(default=None, init=False)  # cancelled | timeout: the engine ended it
    _prefilled: float | None = field(default=None, init=False)  # monotonic time the prefill pass ended

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, text: str) -> None:
        self._held.append(text)
        while len(self._held) > self.hold_back:
            self._send(self._held.popleft())

    def flush(self, drop: bool) -> None:
        while self._held:
            piece = self._held.popleft()
            if not drop:
                self._send(piece)

    def _send(self, piece: str) -> None:
        self._sent.append(piece)
        if piece:
            if self._first is None:
                self._first = time.monotonic()
            self.channel.put(Chunk(piece))


@dataclass
class CallJob:
    """Any function that needs the model (e.g. shadow scoring); its return value resolves `future`."""

    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


Job = GenerationJob | CallJob
