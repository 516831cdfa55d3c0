"""The engine: one worker thread owns the model and runs every forward pass (generation and scoring).

Why one thread: the SAE and capture hooks are registered on the model's modules, so two passes at once
would read each other's activations. Requests wait in a bounded queue (full -> `QueueFull`, the server's
429); the worker takes the first waiting generation and, for up to `batch_wait_s`, gathers more (up to
`max_batch`) into one batch that shares every forward pass. Each row keeps its own sampling, stop, steering
clamps and monitor. A batch runs to its end; requests arriving meanwhile form the next batch.

Per token, before it is emitted: the row's monitor scores it; a block verdict withholds it and ends the row
with `content_filter`; a steer verdict sets the row's clamps from the next pass on. With `hold_back` > 0 the
last tokens are kept back from the client, so a rule that needs a few tokens to fire (sustained over n)
withholds all of them; a block drops them (the cost: `hold_back` tokens of extra latency).

Shutdown (`monitor.lifecycle`): running and queued generations normally finish; `halt()` (the drain's
grace period is over) ends each at its next token with `finish_reason` "shutdown", delivered as a 503
`Failed` that carries the result, so the client is told why and the decision is still recorded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from monitor.generate import Decision, Generator, PromptFeatures, SequenceResult, TokenEvent
from monitor.jobs import (
    CallJob,
    Done,
    EngineStopped,
    Failed,
    GenerationJob,
    Job,
    JobResult,
    QueueFull,
)
from monitor.monitoring import DetectorSet
from sae_assets.hooks import Steering

log = logging.getLogger(__name__)
SHUTDOWN_MESSAGE = "the server is shutting down: generation was stopped at the end of its grace period"


class Engine:
    def __init__(
        self,
        generator: Generator,
        dset: DetectorSet | None,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.005,
        special_ids: set[int] | None = None,
    ) -> None:
        self.gen, self.dset = generator, dset
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.special = set(special_ids or ())
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._deferred: deque[Job] = deque()
        self._stop = threading.Event()
        self._halt = threading.Event()  # shutdown past its grace period: generations end at once
        self._thread: threading.Thread | None = None
        self.busy = False
        self.batches = 0  # counters for /metrics and tests
        self.batched_rows = 0

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="featurewatch-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch (bounded by `timeout`), fail everything still queued, stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in [*self._deferred, *self._drain()]:
            self._fail(job, "the server is shutting down")

    def halt(self) -> None:
        """End every running generation at its next token, and queued ones as they start (finish_reason
        "shutdown"); the engine keeps running so they finish and their decisions are recorded."""
        self._halt.set()

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._deferred)

    def submit(self, job: Job) -> None:
        if self._stop.is_set():
            raise EngineStopped("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None

    # ---- worker -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self._next(timeout=0.1)
            if job is None:
                continue
            self.busy = True
            try:
                if isinstance(job, CallJob):
                    self._run_call(job)
                else:
                    self._run_batch(self._gather(job))
            finally:
                self.busy = False

    def _next(self, timeout: float) -> Job | None:
        if self._deferred:
            return self._deferred.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _drain(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                return jobs

    def _gather(self, first: GenerationJob) -> list[GenerationJob]:
        batch = [first]
        until = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            left = until - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, CallJob):
                self._deferred.append(job)  # runs right after this batch
            elif job.cancelled.is_set():
                self._finish_unstarted(job, "cancelled")
            else:
                batch.append(job)
        return batch

    def _run_call(self, job: CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except Exception as e:
            job.future.set_exception(e)

    def _run_batch(self, batch: list[GenerationJob]) -> None:
        started = time.monotonic()
        self.batches += 1
        self.batched_rows += len(batch)
        results: list[SequenceResult] = []
        try:
            self._generate(batch, results)
        except Exception as e:  # e.g. out of memory: fail this batch, keep serving
            log.exception("generation batch of %d failed", len(batch))
            for job in batch:
                self._fail(job, f"generation failed: {type(e).__name__}: {e}")
            return
        for job, res in zip(batch, results, strict=True):
            self._finish(job, res, started, len(batch))

    def _generate(self, batch: list[GenerationJob], results: list[SequenceResult]) -> None:
        dset, sae = self.dset, self.gen.sae
        steering = Steering(sae) if sae is not None and dset is not None else None
        monitored = dset is not None and any(j.monitor is not None for j in batch)
        # Every latent (one d_in × d_sae product per token) when a probe's evidence names latents.
        attributing = bool(
            dset is not None
            and dset.attributing
            and any(j.monitor is not None and j.monitor.evidence_k > 0 for j in batch)
        )

        def on_prompt(row: int, feats: PromptFeatures) -> Decision | None:
            job = batch[row]
            job._prefilled = time.monotonic()
            if self._interrupted(job):
                return "stop"
            if job.monitor is None:
                return None
            v = job.monitor.observe_prompt(feats.token_ids, feats.latents, feats.resid, self.special)
            return "stop" if v.blocked else None

        def on_token(ev: TokenEvent) -> Decision | None:
            job = batch[ev.row]
            if self._interrupted(job):
                return "stop"
            m = job.monitor
            if m is None:
                return None
            v = m.observe_token(ev.index, ev.text, ev.latents, ev.resid, ev.full_latents)
            if v.blocked:
                return "stop"
            wanted = dict(v.steer) if v.action == "steer" else {}
            if steering is not None and wanted and steering.clamps.get(ev.row) != wanted:
                steering.clamps[ev.row] = wanted
                if m.steered_at is None:
                    m.steered_at = ev.index + 1  # the clamps act from the next token on
            return None

        for ev in self.gen.stream(
            [j.prompt_ids for j in batch],
            [j.params for j in batch],
            watch=dset.latent_ids if monitored and dset is not None else (),
            watch_all=attributing,
            steering=steering,
            capture_points=dset.points if monitored and dset is not None else (),
            on_token=on_token,
            on_prompt=on_prompt if monitored else None,
            results=results,
        ):
            batch[ev.row].push(ev.text)

    def _interrupted(self, job: GenerationJob) -> bool:
        if job.cancelled.is_set():
            job._stopped = "cancelled"
        elif job.deadline is not None and time.monotonic() > job.deadline:
            job._stopped = "timeout"
        elif self._halt.is_set():
            job._stopped = "shutdown"
        return job._stopped is not None

    def _finish(self, job: GenerationJob, res: SequenceResult, started: float, batch_size: int) -> None:
        reason = job._stopped or res.finish_reason or "stop"
        if job.monitor is not None and job.monitor.finish().blocked and reason != "content_filter":
            # Judged on the whole message (a rule that waited for min_tokens): what is still held back
            # is withheld, so a short blocked message never reaches the client at all.
            reason = "content_filter"
            if job.monitor.blocked_at is None:
                job.monitor.blocked_at = len(job.monitor.tokens)
        job.flush(drop=reason == "content_filter")  # held-back tokens that led up to a block: never sent
        now = time.monotonic()
        result = JobResult(
            finish_reason=reason,
            text="".join(job._sent),
            prompt_tokens=res.prompt_tokens,
            completion_tokens=len(job._sent),
            monitor=job.monitor,
            queued_s=started - job.submitted,
            first_token_s=None if job._first is None else job._first - job.submitted,
            total_s=now - job.submitted,
            batch_size=batch_size,
            prefill_s=None if job._prefilled is None else job._prefilled - started,
            monitor_s=job.monitor.seconds if job.monitor is not None else 0.0,
            policy_s=job.monitor.policy_seconds if job.monitor is not None else 0.0,
        )
        job.channel.put(Failed(SHUTDOWN_MESSAGE, 503, result) if reason == "shutdown" else Done(result))

    def _finish_unstarted(self, job: GenerationJob, reason: str) -> None:
        now = time.monotonic()
        result = JobResult(reason, "", len(job.prompt_ids), 0, job.monitor, now - job.submitted, None, 0.0, 0)
        job.channel.put(Done(result))

    def _fail(self, job: Job, error: str) -> None:
        if isinstance(job, CallJob):
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineStopped(error))
        else:
            job.channel.put(Failed(error))
