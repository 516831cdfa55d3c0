"""What an alerts consumer does with one alert: POST it to a webhook, or log it.

A handler gets the alert as a JSON-ready dict (`alert_payload`) and either returns (delivered) or raises
`DeliveryError`; `permanent=True` means retrying cannot help (the receiver refused the alert), so the
consumer dead-letters it at once instead of retrying. Alerts carry ids, verdicts, rule ids and scores,
never prompt or completion text, and webhook URLs are logged masked (they may carry credentials).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Protocol

from monitor.settings import mask_url

log = logging.getLogger("featurewatch.alerts")
RETRYABLE_STATUS = frozenset({408, 425, 429})  # 4xx answers that mean "later", not "never"


class DeliveryError(Exception):
    """A failed delivery; `permanent` ones go to the dead-letter stream without further attempts."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


class Handler(Protocol):
    kind: str  # names the consumer group (featurewatch-alerts-<kind>): each kind sees every alert once

    def __call__(self, alert: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def alert_payload(stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """A stream entry as handlers see it: `rules`/`scores` decoded from JSON, `created` a number, plus
    `stream_id` (unique per alert: receivers deduplicate redeliveries by it). ValueError when malformed."""
    out: dict[str, Any] = dict(fields)
    for name, empty in (("rules", "[]"), ("scores", "{}")):
        out[name] = json.loads(fields.get(name) or empty)
    with contextlib.suppress(ValueError):  # an entry written by something else: keep the raw string
        out["created"] = json.loads(fields.get("created", "0"))
    out["stream_id"] = stream_id
    return out


def rule_ids(alert: dict[str, Any]) -> list[str]:
    return [str(r.get("id")) for r in alert.get("rules", []) if isinstance(r, dict)]


class WebhookSender:
    """POST each alert as JSON. 2xx: delivered. 408/425/429, 5xx, timeouts and connection errors: retry.
    Any other status (4xx, or a redirect, which httpx does not follow): permanent failure."""

    kind = "webhook"

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        import httpx

        self.url = url
        self.masked_url = mask_url(url)
        self.timeout_s = timeout_s
        self._client = httpx.Client(
            timeout=timeout_s, headers={"user-agent": "featurewatch-alerts"}, follow_redirects=False
        )

    def __call__(self, alert: dict[str, Any]) -> None:
        import httpx

        headers = {"x-featurewatch-alert-id": str(alert.get("stream_id", ""))}  # idempotency key
        try:
            resp = self._client.post(self.url, json=alert, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryError(f"timed out after {self.timeout_s:g} s") from None
        except httpx.HTTPError as e:  # connection refused, reset, DNS: the receiver may come back
            raise DeliveryError(f"{type(e).__name__}: {e}") from None
        code = resp.status_code
        if 200 <= code < 300:
            return
        permanent = code < 500 and code not in RETRYABLE_STATUS
        raise DeliveryError(f"HTTP {code} from {self.masked_url}", permanent=permanent)

    def close(self) -> None:
        self._client.close()


class LogSink:
    """One log line per alert at INFO on `featurewatch.alerts`: ids, verdict, rule ids, scores."""

    kind = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or log

    def __call__(self, alert: dict[str, Any]) -> None:
        scores = " ".join(f"{k}={_num(v)}" for k, v in sorted(alert.get("scores", {}).items()))
        suppressed = alert.get("suppressed") or {}
        self.log.info(
            "alert %s request=%s tenant=%s verdict=%s rules=%s scores=[%s]%s",
            alert.get("stream_id"),
            alert.get("id"),
            alert.get("tenant") or "-",
            alert.get("verdict"),
            ",".join(rule_ids(alert)) or "-",
            scores,
            f" suppressed={json.dumps(suppressed, separators=(',', ':'))}" if suppressed else "",
        )

    def close(self) -> None:
        pass


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
