"""Proxy mode: forward generation to an upstream OpenAI-compatible server and monitor what it streams back.

```
client ──> routes_generate ──> prompt pass (engine) ──block──> content_filter, upstream never called
                                     │ allow
                                     v
             upstream (stream) ──deltas──> IncrementalTokenizer ──settled tokens──> TeacherForcer +
                                                                                   RequestMonitor (engine)
client <── job channel (hold-back window) <── token texts that passed <───────────────┘
```

A `ProxyJob` is a `GenerationJob` the engine never runs: a task on the event loop (the pump) feeds its
channel the way the engine would, so the routes stream, assemble, time out, cancel on disconnect and
record proxied requests exactly as generated ones. Text reaches the client only after every local token
covering it was monitored, with the same hold-back window; a block closes the upstream stream at once and
ends the answer with `content_filter`. Steer rules cannot steer an upstream model: `ProxyMonitor` reports
them as flags (`featurewatch.proxy.steer_as_flag` names them).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import Request

from monitor.conversation import History
from monitor.generate import SamplingParams
from monitor.http_errors import APIError
from monitor.jobs import CallJob, Channel, Done, EngineStopped, Failed, GenerationJob, JobResult, QueueFull
from monitor.monitoring import RequestMonitor
from monitor.openai_format import Call
from monitor.proxy_forcing import MonitorContextFull, TeacherForcer, observe_prompt, observe_tokens
from monitor.proxy_tokens import IncrementalTokenizer, Settled
from monitor.proxy_upstream import Upstream, UpstreamFailed, UpstreamStream
from monitor.runtime import Runtime
from policies.evaluate import Verdict

T = TypeVar("T")
log = logging.getLogger(__name__)
QUEUE_RETRY_S = 0.01  # mid-stream, a full engine queue is waited out (the stream is already promised)


def as_flag(v: Verdict) -> Verdict:
    """A verdict as proxy mode acts on it: steer becomes flag (an upstream model cannot be steered)."""
    fired = tuple(replace(f, action="flag") if f.action == "steer" else f for f in v.fired)
    return replace(v, action="flag" if v.action == "steer" else v.action, fired=fired, steer={})


@dataclass
class ProxyMonitor(RequestMonitor):
    """A RequestMonitor whose steer verdicts are flags, and whose summary names the upstream."""

    upstream: dict[str, str] = field(default_factory=dict)  # {"upstream": masked URL, "model": name}

    def observe_prompt(self, *args: Any, **kw: Any) -> Verdict:
        self.prompt_verdict = as_flag(super().observe_prompt(*args, **kw))
        return self.prompt_verdict

    def summary(self, verdict: Verdict | None = None) -> dict[str, Any]:
        v = verdict or self.state.verdict
        out = super().summary(as_flag(v))
        proxy: dict[str, Any] = dict(self.upstream)
        steered = [f.rule_id for f in v.fired if f.action == "steer"]
        if steered:
            proxy["steer_as_flag"] = steered
        out["proxy"] = proxy
        return out


@dataclass
class ProxyJob(GenerationJob):
    """The request's job; `pump` is the task that fills its channel. Cancelling stops the pump."""

    pump: asyncio.Task[None] | None = field(default=None, init=False)

    def cancel(self) -> None:
        super().cancel()
        if self.pump is not None:
            self.pump.get_loop().call_soon_threadsafe(self.pump.cancel)


async def start(
    rt: Runtime,
    request: Request,
    kind: str,
    tenant: str | None,
    messages: list[dict[str, str]],
    ids: list[int],
    body: Any,
    budget: int,
    conversation: History | None = None,
) -> Call:
    """Monitor the prompt, open the upstream stream and start pumping it; the routes respond from the
    returned call. Errors before anything is streamed (429, upstream refused or down) raise APIError.
    `conversation`: the earlier turns of the request's conversation, for conversation-scope rules."""
    s = rt.settings
    upstream = Upstream(s)
    payload = upstream.payload(kind, body, budget)
    route = request.url.path
    info = {"upstream": upstream.name, "model": str(payload["model"])}
    monitor = (
        ProxyMonitor(
            rt.dset,
            rt.policy,
            tenant,
            route,
            evidence_k=s.evidence_top_k,
            conversation=conversation,
            upstream=info,
        )
        if s.monitoring
        else None
    )
    job = ProxyJob(
        list(ids),
        SamplingParams(max_tokens=budget),  # recorded on the job; the upstream samples
        Channel(asyncio.get_running_loop()),
        monitor,
        hold_back=rt.hold_back(monitor.policy) if monitor is not None else 0,
        deadline=time.monotonic() + s.request_timeout_s,
    )
    run = _Run(rt, job, monitor)
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    call = Call(
        kind,
        route,
        f"{prefix}-{uuid.uuid4().hex[:24]}",
        int(time.time()),
        info["model"],
        tenant,
        messages,
        job,
        body.stream,
        body.include_usage,
    )
    if await run.prompt_blocked():
        run.done("content_filter")  # decided locally: nothing was sent upstream
        return call
    stream = await upstream.open(kind, payload)
    job.pump = asyncio.get_running_loop().create_task(run.pump(stream))
    job.pump.add_done_callback(lambda _t: run.never_started(stream))
    return call


class _Run:
    """One proxied request's monitoring: the prompt pass, then the pump that reads the upstream."""

    def __init__(self, rt: Runtime, job: ProxyJob, monitor: ProxyMonitor | None) -> None:
        self.rt, self.job, self.monitor = rt, job, monitor
        self.tokens = IncrementalTokenizer(rt.lm.tokenizer)
        self.forcer = TeacherForcer(
            rt.lm.model,
            rt.sae,
            rt.engine.gen.hook_point,
            rt.dset.points,
            rt.dset.latent_ids,
            getattr(rt.lm.model.config, "max_position_embeddings", None),
            watch_all=bool(rt.dset.attributing) and rt.settings.evidence_top_k > 0,
        )
        self.inflight: Future[Any] | None = None
        self.usage: dict[str, int] | None = None
        self.upstream_finish: str | None = None
        self.prefill_s: float | None = None
        self.started = False  # the pump's body ran (a task cancelled before its first step never does)

    # ---- engine calls ---------------------------------------------------------------------------
    async def _engine(self, fn: Callable[[], T], retry: bool) -> T:
        """Run `fn` on the engine thread (it owns the model). Before the stream starts a full queue is
        the client's 429; mid-stream it is waited out."""
        while True:
            job = CallJob(fn)
            try:
                self.rt.engine.submit(job)
                break
            except QueueFull as e:
                if not retry:
                    headers = {"Retry-After": str(self.rt.settings.retry_after_s)}
                    raise APIError(
                        429, f"server busy: {e}; retry later", code="queue_full", headers=headers
                    ) from None
                await asyncio.sleep(QUEUE_RETRY_S)
            except EngineStopped as e:
                raise APIError(503, str(e)) from None
        self.inflight = job.future
        result: T = await asyncio.wrap_future(job.future)
        return result

    async def prompt_blocked(self) -> bool:
        mon = self.monitor
        if mon is None:
            return False
        t0 = time.monotonic()
        special = self.rt.engine.special
        verdict = await self._engine(
            lambda: observe_prompt(self.forcer, mon, self.job.prompt_ids, special), False
        )
        self.prefill_s = time.monotonic() - t0
        return verdict.blocked

    async def _observe(self, settled: list[Settled]) -> bool:
        """Monitor settled tokens, then release their text (hold-back applies); True on a block."""
        mon = self.monitor
        if not settled:
            return False
        if mon is None:
            for tok in settled:
                self.job.push(tok.text)
            return False
        seen = await self._engine(lambda: observe_tokens(self.forcer, mon, settled), True)
        for tok in settled[: seen.scored - 1 if seen.blocked else seen.scored]:
            self.job.push(tok.text)  # the trigger token itself is never pushed
        return seen.blocked

    # ---- the pump --------------------------------------------------------------------------------
    async def pump(self, stream: UpstreamStream) -> None:
        """Read the upstream to its end or the first block; always ends the channel with Done or Failed."""
        self.started = True
        try:
            reason = await self._read(stream)
        except UpstreamFailed as e:
            self.job.flush(drop=True)  # the held window is not known to be safe: the rest never came
            self.job.channel.put(Failed(str(e), 502, self._result("upstream_error")))
            return
        except asyncio.CancelledError:  # the client went away: record what happened so far
            await self._settle()
            self.done("cancelled")
            raise
        except Exception as e:  # an engine step failed (e.g. the server is stopping): end the request
            log.exception("proxied request failed while monitoring")
            self.job.flush(drop=True)
            self.job.channel.put(Failed(f"monitoring failed: {type(e).__name__}: {e}", 500))
            return
        finally:
            await stream.close()
        self.done(reason)

    async def _read(self, stream: UpstreamStream) -> str:
        try:
            async for delta in stream.deltas():
                if self.job.deadline is not None and time.monotonic() > self.job.deadline:
                    return "timeout"
                self.usage = delta.usage or self.usage
                self.upstream_finish = delta.finish_reason or self.upstream_finish
                if delta.text and await self._observe(self.tokens.push(delta.text)):
                    return "content_filter"
            if await self._observe(self.tokens.finish()):
                return "content_filter"
        except MonitorContextFull:
            return "length"  # unmonitored text is never released
        return self.upstream_finish or "stop"

    async def _settle(self) -> None:
        """Wait for an engine step still running on the monitor (it must not change under the record)."""
        fut = self.inflight
        if fut is not None and not fut.done():
            with suppress(Exception, asyncio.CancelledError):
                await asyncio.wrap_future(fut)

    def never_started(self, stream: UpstreamStream) -> None:
        """Done-callback of the pump: a task cancelled before its first step never ran its body, so
        the stream is closed and the request ended here."""
        if self.started:
            return
        asyncio.get_running_loop().create_task(stream.close())
        self.done("cancelled")

    def done(self, reason: str) -> None:
        self.job.channel.put(Done(self._result(reason)))

    def _result(self, reason: str) -> JobResult:
        """The request's result, as the engine builds it for a generated one."""
        job, mon = self.job, self.monitor
        if (
            mon is not None
            and reason != "upstream_error"
            and mon.finish().blocked
            and reason != "content_filter"
        ):
            reason = "content_filter"  # judged on the whole message (a rule that waited for min_tokens)
            if mon.blocked_at is None:
                mon.blocked_at = len(mon.tokens)
        job.flush(drop=reason == "content_filter")
        # The upstream's usage when it counted what the client got; else the local tokenizer's counts.
        upstream = self.usage if reason not in ("content_filter", "upstream_error") else None
        prompt = _count(upstream, "prompt_tokens", len(job.prompt_ids))
        completion = _count(upstream, "completion_tokens", len(job._sent))
        now = time.monotonic()
        return JobResult(
            finish_reason=reason,
            text="".join(job._sent),
            prompt_tokens=prompt,
            completion_tokens=completion,
            monitor=mon,
            queued_s=0.0,
            first_token_s=None if job._first is None else job._first - job.submitted,
            total_s=now - job.submitted,
            batch_size=1,
            prefill_s=self.prefill_s,
            monitor_s=(mon.seconds if mon is not None else 0.0) + self.forcer.seconds,
            policy_s=mon.policy_seconds if mon is not None else 0.0,
        )


def _count(usage: dict[str, Any] | None, key: str, local: int) -> int:
    value = (usage or {}).get(key)
    return value if isinstance(value, int) and value >= 0 else local
