"""POST /v1/chat/completions and /v1/completions: monitored generation, streamed (SSE) or not.

Headers: `x-featurewatch-verdict` carries the verdict. A non-streamed response has the final one; a
stream's headers leave before the completion exists, so there it is the prompt-phase verdict, and the
final verdict is in the last chunk's `featurewatch` field. A block ends the output with
`finish_reason: "content_filter"`, the policy message in `refusal` (chat) and no text from the token that
triggered it (nor the held-back window before it).

Proxy mode (`upstream_url` set): the same routes forward to the upstream server instead of generating,
and stream its answer back through the monitor (`monitor.proxy`); responses, blocks and decision records
look the same, with a `proxy` field in `featurewatch` naming the upstream.

Shared state (`monitor.shared_state`): rate limits are checked before a request starts (429 with
`Retry-After`) and its tokens charged when it ends; a request naming a conversation has its earlier
turns loaded before generating and its own turn stored before the response ends (proxy mode: not yet).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from monitor.api_models import ChatCompletionRequest, CompletionRequest
from monitor.conversation import History, conversation_id
from monitor.events import DecisionEvent, emit
from monitor.generate import SamplingParams
from monitor.http_errors import APIError, content, error_body
from monitor.jobs import Channel, Chunk, Done, EngineStopped, Failed, GenerationJob, JobResult, QueueFull
from monitor.monitoring import RequestMonitor
from monitor.openai_format import Call, chunk, data, final_chunk, full_body, usage
from monitor.proxy import ProxyMonitor
from monitor.proxy import start as start_proxy
from monitor.runtime import Runtime
from monitor.shared_state import shared_of
from monitor.tenancy import tenant_of
from monitor.versions import policy_versions

router = APIRouter()
VERDICT_HEADER = "x-featurewatch-verdict"
STREAMED: dict[int | str, Any] = {200: {"content": content("text/event-stream")}}  # stream: true (OpenAPI)
DISCONNECT_POLL_S = 0.25


@router.post("/v1/chat/completions", response_model=None, responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    rt: Runtime = request.app.state.runtime
    tenant = tenant_of(request)
    _check_model(rt, body.model)
    try:
        ids = rt.lm.chat_ids(body.chat())
    except Exception as e:  # chat templates raise their own errors (role order, jinja)
        raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
    call = await _begin(rt, request, "chat", tenant, body.chat(), ids, body)
    return await _respond(rt, request, call)


@router.post("/v1/completions", response_model=None, responses=STREAMED)
async def completions(body: CompletionRequest, request: Request) -> Any:
    rt: Runtime = request.app.state.runtime
    tenant = tenant_of(request)
    _check_model(rt, body.model)
    ids = rt.lm.tokenizer(body.text(), add_special_tokens=True)["input_ids"]
    if not ids:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    call = await _begin(rt, request, "text", tenant, [{"role": "user", "content": body.text()}], ids, body)
    return await _respond(rt, request, call)


# ---- request set-up ---------------------------------------------------------------------------------
def _check_model(rt: Runtime, model: str) -> None:
    if rt.settings.upstream_url is not None:
        return  # proxy mode: the upstream serves (and checks) the model, or `upstream_model` replaces it
    if model != rt.settings.model_name:
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {rt.settings.model_name!r}",
            param="model",
            code="model_not_found",
        )


async def _begin(
    rt: Runtime,
    request: Request,
    kind: str,
    tenant: str | None,
    messages: list[dict[str, str]],
    ids: list[int],
    body: ChatCompletionRequest | CompletionRequest,
) -> Call:
    """Check the limits, then start generating here, or forwarding upstream in proxy mode."""
    s = rt.settings
    if len(ids) > rt.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {len(ids)} tokens, over the limit of {rt.max_prompt_tokens}",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    budget = body.token_budget() or s.default_max_tokens
    if budget > s.max_tokens_limit:
        raise APIError(
            400, f"max_tokens: {budget} is over the limit of {s.max_tokens_limit}", param="max_tokens"
        )
    shared = shared_of(request)
    conversation: History | None = None
    if shared is not None:
        conv_id = conversation_id(request.headers, body.metadata)  # 400 when malformed
        await shared.admit(request, tenant)  # rate limits: 429 / 503
        if s.monitoring:
            conversation = await shared.history(tenant, conv_id)
    if s.upstream_url is not None:
        return await start_proxy(rt, request, kind, tenant, messages, ids, body, budget, conversation)
    return _start(rt, request, kind, tenant, messages, ids, body, budget, conversation)


def _start(
    rt: Runtime,
    request: Request,
    kind: str,
    tenant: str | None,
    messages: list[dict[str, str]],
    ids: list[int],
    body: ChatCompletionRequest | CompletionRequest,
    budget: int,
    conversation: History | None = None,
) -> Call:
    s = rt.settings
    params = SamplingParams(
        max_tokens=budget,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
    )
    route = request.url.path
    policy = rt.policy  # pinned for the whole request, even if a reload lands meanwhile
    monitor = (
        RequestMonitor(rt.dset, policy, tenant, route, s.evidence_top_k, conversation)
        if s.monitoring
        else None
    )
    job = GenerationJob(
        list(ids),
        params,
        Channel(asyncio.get_running_loop()),
        monitor,
        hold_back=rt.hold_back(policy) if monitor is not None else 0,
        deadline=time.monotonic() + s.request_timeout_s,
    )
    try:
        rt.engine.submit(job)
    except QueueFull as e:
        raise APIError(
            429,
            f"server busy: {e}; retry later",
            code="queue_full",
            headers={"Retry-After": str(s.retry_after_s)},
        ) from None
    except EngineStopped as e:
        raise APIError(503, str(e)) from None
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Call(
        kind,
        route,
        f"{prefix}-{uuid.uuid4().hex[:24]}",
        int(time.time()),
        s.model_name,
        tenant,
        messages,
        job,
        body.stream,
        body.include_usage,
    )


# ---- responses ------------------------------------------------------------------------------------------
async def _respond(rt: Runtime, request: Request, call: Call) -> Any:
    if call.stream:
        first = await _next_item(call, request)
        if first is None:
            _record_later(rt, request, call)
            return JSONResponse(error_body(499, "client closed the request"), 499)
        mon = call.job.monitor
        pv = mon.prompt_verdict.action if mon is not None and mon.prompt_verdict is not None else "allow"
        headers = {VERDICT_HEADER: pv, "cache-control": "no-cache"}
        return StreamingResponse(
            _sse(rt, request, call, first), media_type="text/event-stream", headers=headers
        )
    text: list[str] = []
    while True:
        item = await _next_item(call, request)
        if item is None:
            _record_later(rt, request, call)
            return JSONResponse(error_body(499, "client closed the request"), 499)
        if isinstance(item, Failed):
            if item.result is not None:
                await _record(rt, request, call, item.result)
            raise APIError(item.status, item.error)
        if isinstance(item, Chunk):
            text.append(item.text)
            continue
        res = item.result
        await _record(rt, request, call, res)
        if res.finish_reason == "timeout":
            raise APIError(504, f"generation took longer than {rt.settings.request_timeout_s} s")
        body = full_body(call, res)
        return JSONResponse(body, headers={VERDICT_HEADER: body["featurewatch"]["verdict"]})


async def _next_item(call: Call, request: Request) -> Chunk | Done | Failed | None:
    """The next item from the engine; None (and the job cancelled) once the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(call.job.channel.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                call.job.cancel()
                return None


async def _sse(rt: Runtime, request: Request, call: Call, first: Chunk | Done | Failed) -> AsyncIterator[str]:
    item: Chunk | Done | Failed | None = first
    done = False
    try:
        yield data(chunk(call, {"role": "assistant", "content": ""} if call.kind == "chat" else {"text": ""}))
        while item is not None:
            if isinstance(item, Failed):
                if item.result is not None:
                    await _record(rt, request, call, item.result)
                yield data(error_body(item.status, item.error))
                break
            if isinstance(item, Chunk):
                delta = {"content": item.text} if call.kind == "chat" else {"text": item.text}
                yield data(chunk(call, delta))
                item = await call.job.channel.get()
                continue
            res = item.result
            done = True
            await _record(rt, request, call, res)
            if res.finish_reason == "timeout":
                yield data(error_body(504, f"generation took longer than {rt.settings.request_timeout_s} s"))
                break
            yield data(final_chunk(call, res))
            if call.include_usage:
                yield data({**chunk(call, None), "choices": [], "usage": usage(res)})
            break
        yield "data: [DONE]\n\n"
    finally:
        if not done and not isinstance(item, Failed):
            call.job.cancel()  # the client went away mid-stream: stop generating for it
            _record_later(rt, request, call)


def _record_later(rt: Runtime, request: Request, call: Call) -> None:
    """The client is gone but the decision must still be recorded: wait for the engine's result."""

    async def drain() -> None:
        while True:
            item = await call.job.channel.get()
            if isinstance(item, Done):
                await _record(rt, request, call, item.result)
                return
            if isinstance(item, Failed):
                if item.result is not None:
                    await _record(rt, request, call, item.result)
                return

    task = asyncio.get_running_loop().create_task(drain())
    _pending.add(task)  # keep a reference until it ends (the loop holds tasks only weakly)
    task.add_done_callback(_pending.discard)


_pending: set[asyncio.Task[None]] = set()


async def _record(rt: Runtime, request: Request, call: Call, res: JobResult) -> None:
    """Hand the decision to the sinks (audit trail, traces): every monitored request, whatever its verdict;
    then store its conversation turn and charge its tokens (shared state)."""
    if res.monitor is not None:
        _emit(rt, request, call, res, res.monitor)
    shared = shared_of(request)
    if shared is not None:
        tokens = res.prompt_tokens + res.completion_tokens
        await shared.finished(request, call.tenant, call.request_id, res.monitor, tokens)


def _emit(rt: Runtime, request: Request, call: Call, res: JobResult, mon: RequestMonitor) -> None:
    summary = mon.summary()
    ev = DecisionEvent(
        request_id=call.request_id,
        route=call.route,
        tenant=call.tenant,
        model=call.model,
        created=call.created,
        started=call.started,
        finish_reason=res.finish_reason,
        verdict=summary["verdict"],
        summary=summary,
        evidence=mon.evidence(),
        messages=call.messages,
        completion=res.text,
        usage=usage(res),
        timings=res.timings(),
        versions={
            **rt.versions,
            **policy_versions(mon.policy),
            **({"upstream": mon.upstream["upstream"]} if isinstance(mon, ProxyMonitor) else {}),
        },
    )
    emit(request.app.state.sinks, ev)
