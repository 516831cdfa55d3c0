"""Every OpenTelemetry name featurewatch emits, in one place.

GenAI names follow the OpenTelemetry semantic conventions for generative AI (development status; see
https://github.com/open-telemetry/semantic-conventions-genai): span `{operation} {model}`, attributes
`gen_ai.*`, the `gen_ai.evaluation.result` event, and the `gen_ai.server.*` metrics. Names the conventions
do not cover (the guardrail decision, detections, monitoring overhead) use the `featurewatch.` namespace.
"""

from __future__ import annotations

# ---- GenAI attributes --------------------------------------------------------------------------------
OPERATION_NAME = "gen_ai.operation.name"  # "chat" | "text_completion"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
INPUT_MESSAGES = "gen_ai.input.messages"  # content: only with capture on
OUTPUT_MESSAGES = "gen_ai.output.messages"  # content: only with capture on

# ---- the evaluation event (one per detector) ---------------------------------------------------------
EVALUATION_EVENT = "gen_ai.evaluation.result"
EVALUATION_NAME = "gen_ai.evaluation.name"
EVALUATION_SCORE_VALUE = "gen_ai.evaluation.score.value"
EVALUATION_SCORE_LABEL = "gen_ai.evaluation.score.label"  # "fired" | "pass"
EVALUATION_EXPLANATION = "gen_ai.evaluation.explanation"

# ---- general attributes ----------------------------------------------------------------------------
HTTP_ROUTE = "http.route"
SERVICE_NAME = "service.name"

# ---- featurewatch: the guardrail decision ------------------------------------------------------------
GUARDRAIL_ACTION = "featurewatch.guardrail.action"  # allow | log | flag | steer | block
GUARDRAIL_RULES = "featurewatch.guardrail.rules"  # ids of the rules that fired
GUARDRAIL_POLICY = "featurewatch.guardrail.policy"  # name@version
GUARDRAIL_STEERED = "featurewatch.guardrail.steered"
GUARDRAIL_BLOCKED_AT = "featurewatch.guardrail.blocked_at"  # completion token index
TENANT = "featurewatch.tenant"
DETECTOR = "featurewatch.detector"
ACTION = "featurewatch.action"
VERDICT = "featurewatch.verdict"
BATCH_SIZE = "featurewatch.batch_size"

# ---- child spans -------------------------------------------------------------------------------------
SPAN_QUEUE = "queue"
SPAN_PREFILL = "prefill"
SPAN_DECODE = "decode"
SPAN_MONITORING = "monitoring"  # cumulative time in detectors + policy, drawn from the start of decode
SPAN_POLICY = "policy evaluation"  # cumulative time in policy evaluation

# ---- metrics -----------------------------------------------------------------------------------------
METRIC_REQUEST_DURATION = "gen_ai.server.request.duration"  # s
METRIC_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"  # s
METRIC_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"  # s
METRIC_DETECTIONS = "featurewatch.detections"  # fired rules, by detector and action
METRIC_REQUESTS = "featurewatch.requests"  # monitored requests, by verdict
METRIC_MONITORING_OVERHEAD = "featurewatch.monitoring.overhead"  # monitor time / request time (ratio)
