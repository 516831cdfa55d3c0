"""OpenTelemetry traces and metrics for every monitored request, built from its `DecisionEvent`.

The telemetry is a decision sink: it runs on the event loop right after a request ends, so it adds no
work to the engine thread. Span times are reconstructed from the request's measured timings (queue,
prefill, time to first token, total; monitoring and policy time are cumulative and drawn from the start of
decode). Per request: one span `{operation} {model}` with the GenAI attributes, the guardrail decision as
`featurewatch.guardrail.*` attributes, one `gen_ai.evaluation.result` event per detector, and child spans
`queue`, `prefill`, `decode`, `monitoring`, `policy evaluation`. Prompt and completion text are recorded
only with `capture_content` on.

Exporters: OTLP/HTTP when an endpoint is configured, else JSON lines in `<data dir>/traces.jsonl`, or
none; metrics are read by Prometheus at `/metrics`. Tests pass their own in-memory exporter and reader.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import IO, Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from monitor import otel_names as N
from monitor.events import DecisionEvent

log = logging.getLogger(__name__)
PROVIDER = "featurewatch"
_NS = 1_000_000_000


class Telemetry:
    def __init__(
        self,
        *,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        capture_content: bool = False,
        batch: bool = True,
        service_name: str = "featurewatch",
    ) -> None:
        resource = Resource.create({N.SERVICE_NAME: service_name})
        self.capture_content = capture_content
        self.tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            proc = BatchSpanProcessor(span_exporter) if batch else SimpleSpanProcessor(span_exporter)
            self.tracer_provider.add_span_processor(proc)
        self.tracer = self.tracer_provider.get_tracer("featurewatch")
        self.meter_provider = MeterProvider(
            metric_readers=[metric_reader] if metric_reader is not None else [], resource=resource
        )
        meter = self.meter_provider.get_meter("featurewatch")
        self.duration = meter.create_histogram(N.METRIC_REQUEST_DURATION, unit="s")
        self.ttft = meter.create_histogram(N.METRIC_TIME_TO_FIRST_TOKEN, unit="s")
        self.tpot = meter.create_histogram(N.METRIC_TIME_PER_OUTPUT_TOKEN, unit="s")
        self.overhead = meter.create_histogram(N.METRIC_MONITORING_OVERHEAD, unit="1")
        self.detections = meter.create_counter(N.METRIC_DETECTIONS, unit="{rule}")
        self.requests = meter.create_counter(N.METRIC_REQUESTS, unit="{request}")

    # ---- the sink -----------------------------------------------------------------------------------
    def sink(self, ev: DecisionEvent) -> None:
        end = time.time_ns()
        t = ev.timings
        total = float(t.get("total_s") or 0.0)
        start = end - int(total * _NS)
        self._trace(ev, start, end)
        self._metrics(ev)

    def _trace(self, ev: DecisionEvent, start: int, end: int) -> None:
        operation = "chat" if ev.route.endswith("/chat/completions") else "text_completion"
        span = self.tracer.start_span(
            f"{operation} {ev.model}",
            kind=SpanKind.SERVER,
            start_time=start,
            attributes=self._attrs(ev, operation),
        )
        ctx = set_span_in_context(span)
        for name, value in (ev.summary.get("scores") or {}).items():
            fired = any(r["detector"] == name for r in ev.summary.get("rules", []))
            span.add_event(
                N.EVALUATION_EVENT,
                {
                    N.EVALUATION_NAME: name,
                    N.EVALUATION_SCORE_VALUE: float(value),
                    N.EVALUATION_SCORE_LABEL: "fired" if fired else "pass",
                    N.RESPONSE_ID: ev.request_id,
                },
                timestamp=end,
            )
        for child, c_start, c_end in self._children(ev, start, end):
            self.tracer.start_span(child, context=ctx, start_time=c_start).end(end_time=c_end)
        if ev.finish_reason == "timeout":
            span.set_status(Status(StatusCode.ERROR, "timeout"))
        span.end(end_time=end)

    def _attrs(self, ev: DecisionEvent, operation: str) -> dict[str, Any]:
        s = ev.summary
        attrs: dict[str, Any] = {
            N.OPERATION_NAME: operation,
            N.PROVIDER_NAME: PROVIDER,
            N.REQUEST_MODEL: ev.model,
            N.RESPONSE_MODEL: ev.model,
            N.RESPONSE_ID: ev.request_id,
            N.RESPONSE_FINISH_REASONS: [ev.finish_reason],
            N.USAGE_INPUT_TOKENS: int(ev.usage.get("prompt_tokens", 0)),
            N.USAGE_OUTPUT_TOKENS: int(ev.usage.get("completion_tokens", 0)),
            N.HTTP_ROUTE: ev.route,
            N.GUARDRAIL_ACTION: ev.verdict,
            N.GUARDRAIL_RULES: [r["id"] for r in s.get("rules", [])],
            N.GUARDRAIL_POLICY: str(s.get("policy", "")),
            N.GUARDRAIL_STEERED: bool(s.get("steered", False)),
            N.BATCH_SIZE: int(ev.timings.get("batch_size") or 0),
        }
        if ev.tenant is not None:
            attrs[N.TENANT] = ev.tenant
        if s.get("blocked_at") is not None:
            attrs[N.GUARDRAIL_BLOCKED_AT] = int(s["blocked_at"])
        if self.capture_content:
            attrs[N.INPUT_MESSAGES] = json.dumps(ev.messages, ensure_ascii=False)
            attrs[N.OUTPUT_MESSAGES] = json.dumps(
                [{"role": "assistant", "content": ev.completion}], ensure_ascii=False
            )
        return attrs

    @staticmethod
    def _children(ev: DecisionEvent, start: int, end: int) -> list[tuple[str, int, int]]:
        t = ev.timings
        queued = start + int(float(t.get("queued_s") or 0.0) * _NS)
        prefill_end = queued + int(float(t.get("prefill_s") or 0.0) * _NS)
        monitor = int(float(t.get("monitor_s") or 0.0) * _NS)
        policy = int(float(t.get("policy_s") or 0.0) * _NS)
        return [
            (N.SPAN_QUEUE, start, queued),
            (N.SPAN_PREFILL, queued, prefill_end),
            (N.SPAN_DECODE, prefill_end, end),
            (N.SPAN_MONITORING, prefill_end, min(end, prefill_end + monitor)),
            (N.SPAN_POLICY, prefill_end, min(end, prefill_end + policy)),
        ]

    def _metrics(self, ev: DecisionEvent) -> None:
        t = ev.timings
        operation = "chat" if ev.route.endswith("/chat/completions") else "text_completion"
        base = {N.OPERATION_NAME: operation, N.REQUEST_MODEL: ev.model}
        total = float(t.get("total_s") or 0.0)
        self.duration.record(total, {**base, N.VERDICT: ev.verdict})
        self.requests.add(1, {**base, N.VERDICT: ev.verdict})
        first = t.get("first_token_s")
        n_out = int(ev.usage.get("completion_tokens", 0))
        if first is not None:
            self.ttft.record(float(first), base)
            if n_out > 1:
                self.tpot.record((total - float(first)) / (n_out - 1), base)
        if total > 0:
            self.overhead.record(float(t.get("monitor_s") or 0.0) / total, base)
        for r in ev.summary.get("rules", []):
            self.detections.add(1, {N.DETECTOR: r["detector"], N.ACTION: r["action"]})

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


# ---- exporters ---------------------------------------------------------------------------------------
class JsonLinesSpanExporter(SpanExporter):
    """Spans as one JSON object per line (the SDK's own JSON form), appended to a local file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: IO[str] = path.open("a", encoding="utf-8")

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        for span in spans:
            self._fh.write(json.dumps(json.loads(span.to_json())) + "\n")
        self._fh.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._fh.close()


def prometheus_reader() -> MetricReader:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    return PrometheusMetricReader()


def unregister_prometheus(reader: MetricReader) -> None:
    """The Prometheus reader registers a collector in prometheus_client's global registry: remove it when
    the app stops, so a second app in the same process does not report the first one's metrics."""
    from prometheus_client import REGISTRY

    collector = getattr(reader, "_collector", None)
    if collector is not None:
        with contextlib.suppress(KeyError):  # already gone
            REGISTRY.unregister(collector)


def from_settings(settings: Any) -> tuple[Telemetry, MetricReader | None]:
    """The server's telemetry: exporter from the settings, Prometheus reader when metrics are on."""
    exporter: SpanExporter | None = None
    kind = "otlp" if settings.otlp_endpoint and settings.otel_exporter != "none" else settings.otel_exporter
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = (
            OTLPSpanExporter(endpoint=settings.otlp_endpoint)
            if settings.otlp_endpoint
            else OTLPSpanExporter()
        )
    elif kind == "file":
        exporter = JsonLinesSpanExporter(settings.resolved_data_dir() / "traces.jsonl")
    reader = prometheus_reader() if settings.metrics_enabled else None
    tel = Telemetry(
        span_exporter=exporter, metric_reader=reader, capture_content=settings.otel_capture_content
    )
    return tel, reader
