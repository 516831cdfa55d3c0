"""Alerts: consumers of the alerts stream (`featurewatch:alerts`) that the sidecar (or `featurewatch alerts
run`) starts from the settings: a webhook sender and/or a log sink, each its own consumer group.

The parts: `monitor.alerts_consumer` (the consumer thread: consumer groups, acks, retries with backoff,
dead-lettering, XAUTOCLAIM of dead consumers' entries), `monitor.alerts_config` (its settings),
`monitor.alerts_handlers` (webhook, log) and `monitor.alerts_dedup` (per-(rule, tenant) windows shared
through Redis).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from monitor.alerts_config import ConsumerConfig
from monitor.alerts_consumer import AlertConsumer, ClientSource
from monitor.alerts_handlers import DeliveryError, Handler, LogSink, WebhookSender
from monitor.audit_record import Keys
from monitor.settings import Settings

__all__ = [
    "AlertConsumer",
    "ConsumerConfig",
    "DeliveryError",
    "LogSink",
    "WebhookSender",
    "handlers_from_settings",
    "start_alert_consumers",
    "start_sidecar_alerts",
    "stop_alert_consumers",
]
log = logging.getLogger("featurewatch.alerts")
WEBHOOK_TIMEOUT_S = 5.0


def handlers_from_settings(settings: Settings) -> list[tuple[Handler, float]]:
    """The handlers the settings ask for, each with its per-call timeout (0: does not wait on anything)."""
    out: list[tuple[Handler, float]] = []
    if settings.alerts_webhook_url:
        out.append((WebhookSender(settings.alerts_webhook_url, WEBHOOK_TIMEOUT_S), WEBHOOK_TIMEOUT_S))
    if settings.alerts_log:
        out.append((LogSink(), 0.0))
    return out


def start_alert_consumers(
    settings: Settings, client: ClientSource, keys: Keys | None = None
) -> list[AlertConsumer]:
    """Start one consumer per configured handler (webhook, log); [] when none is configured. `client` may
    be a callable returning the client (the embedded backend's, which is replaced if its server died)."""
    consumers = []
    for handler, timeout_s in handlers_from_settings(settings):
        cfg = ConsumerConfig.for_handler(settings, handler, timeout_s)
        consumers.append(AlertConsumer(client, handler, cfg, keys).start())
        target = handler.masked_url if isinstance(handler, WebhookSender) else "the log"
        log.info("alerts: consumer %s in group %s delivers to %s", cfg.consumer, cfg.group, target)
    return consumers


def stop_alert_consumers(consumers: list[AlertConsumer], timeout_s: float = 30.0) -> None:
    """Ask all to stop at once, then wait for each (together at most about one handler timeout)."""
    for c in consumers:
        c.request_stop()
    deadline = time.monotonic() + timeout_s
    for c in consumers:
        if not c.stop(max(0.0, deadline - time.monotonic())):
            log.warning("alerts: %s consumer did not stop within %.0f s", c.handler.kind, timeout_s)


def start_sidecar_alerts(settings: Settings, audit: Any) -> list[AlertConsumer]:
    """The sidecar's consumers over its audit store's Redis (`server.create_app`'s lifespan)."""
    if not (settings.alerts_webhook_url or settings.alerts_log):
        return []
    if audit is None:
        log.warning("alerts: no consumers: the audit trail is off, so nothing writes the alerts stream")
        return []
    return start_alert_consumers(settings, audit.backend.client)  # a callable: follows server restarts
