"""One policy for every replica: published once to Redis, applied by each sidecar.

With `policy_source: redis` a replica reads the published policy at start-up and then follows it:
`publish_policy` stores the text (hash `featurewatch:policy:current`) and announces its digest on the
channel `featurewatch:policy:updates`; every replica's `PolicySubscriber` re-reads the hash on each
message — and after every reconnect, so an announcement missed while Redis was away is caught up — and
hands it to `PolicyHolder.apply_text`, which checks it against that replica's detectors and keeps the old
policy when it is invalid (fail closed, never half-applied). Each replica reports what it runs in the hash
`featurewatch:policy:replicas` (replica -> digest, policy, applied or the rejection's issues), which
`featurewatch policy status` and `GET /v1/admin/policy` show.

The file named by `policy` is the start-up fallback until something is published; its watcher is off in
this mode, so a stale file on one replica cannot override the fleet's policy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from monitor.settings import Settings
from policies.loader import PolicyIssue, check_policy
from policies.reload import PolicyHolder

log = logging.getLogger("featurewatch.policy")
PREFIX = "featurewatch:"
CURRENT = PREFIX + "policy:current"  # hash: text, digest, name, version, source, by, published_at
CHANNEL = PREFIX + "policy:updates"  # pub/sub: the new digest
REPLICAS = PREFIX + "policy:replicas"  # hash: replica -> JSON status
RETRY_MAX_S = 10.0  # reconnect backoff cap; each reconnect re-reads CURRENT
ClientFactory = Callable[[], redis.Redis]


class PolicyPublishError(ValueError):
    """The text is not a valid policy; `issues` says where."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


@dataclass(frozen=True)
class Published:
    digest: str
    name: str
    version: str
    published_at: float


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_in_process = itertools.count(1)


def replica_name() -> str:
    """host-pid, plus -N for a second sidecar app in one process (tests, embedding)."""
    n = next(_in_process)
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{n}" if n > 1 else "")


def publish_policy(
    client: redis.Redis,
    text: str,
    *,
    source: str,
    by: str,
    known_detectors: set[str] | None = None,
) -> Published:
    """Check `text` (against `known_detectors` when given) and publish it to every replica. Replicas
    still check it against their own detectors and report the outcome in REPLICAS."""
    policy, issues = check_policy(text, source, known_detectors)
    if issues or policy is None:
        raise PolicyPublishError(issues)
    pub = Published(digest(text), policy.name, policy.version, round(time.time(), 3))
    fields: dict[Any, Any] = {
        "text": text,
        "digest": pub.digest,
        "name": pub.name,
        "version": pub.version,
        "source": source,
        "by": by,
        "published_at": str(pub.published_at),
    }
    pipe = client.pipeline(transaction=True)  # the text is in place before anyone hears of it
    pipe.hset(CURRENT, mapping=fields)
    pipe.publish(CHANNEL, pub.digest)
    pipe.execute()
    log.info("policy %r version %s published (%s) by %s", pub.name, pub.version, pub.digest[:12], by)
    return pub


def start_policy_sync(settings: Settings, holder: PolicyHolder, audit: Any = None) -> PolicySubscriber | None:
    """The sidecar's subscriber when `policy_source` is redis (None otherwise); it shares the audit store's
    Redis connection when there is one. Blocks up to 5 s for the first catch-up: call off the event loop."""
    if settings.policy_source != "redis":
        return None
    from monitor.redis_conn import backend_for

    shared = getattr(audit, "backend", None)
    backend = shared if shared is not None else backend_for(settings)
    sub = PolicySubscriber(holder, backend.client, close=None if shared is not None else backend.close)
    return sub.start()


def current(client: redis.Redis) -> dict[str, str] | None:
    raw: Any = client.hgetall(CURRENT)
    return dict(raw) if raw else None


def replica_status(client: redis.Redis) -> dict[str, dict[str, Any]]:
    raw: Any = client.hgetall(REPLICAS)
    return {str(k): json.loads(v) for k, v in (raw or {}).items()}


class PolicySubscriber:
    """Follows the published policy on a daemon thread until `stop()`."""

    def __init__(
        self,
        holder: PolicyHolder,
        client: ClientFactory,
        name: str | None = None,
        *,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.holder, self._client, self._close = holder, client, close
        self.name = name or replica_name()
        self.applied: str | None = None  # digest of the published text this replica runs
        self._stop = threading.Event()
        self._ready = threading.Event()  # set after the first successful catch-up
        self._thread = threading.Thread(target=self._run, name="policy-subscriber", daemon=True)

    def start(self, wait_s: float = 5.0) -> PolicySubscriber:
        """Start, and wait up to `wait_s` for the first catch-up so start-up serves the fleet's policy."""
        self._thread.start()
        if not self._ready.wait(wait_s):
            log.warning("policy: Redis not reachable yet; serving %s until it is", self.holder.path)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._close is not None:
            self._close()

    def catch_up(self) -> None:
        """Apply the published policy if it differs from what this replica runs."""
        client = self._client()
        cur = current(client)
        if cur is None or cur.get("digest") == self.applied:
            return
        issues = self.holder.apply_text(cur["text"], f"redis:{cur.get('source', '?')}")
        if not issues:
            self.applied = cur["digest"]
        self._report(client, cur, issues)

    def _report(self, client: redis.Redis, cur: dict[str, str], issues: list[PolicyIssue]) -> None:
        p = self.holder.policy
        status = {
            "digest": self.applied,
            "policy": f"{p.name}@{p.version}",
            "generation": self.holder.generation,
            "published": cur.get("digest"),
            "state": "rejected" if issues else "applied",
            "issues": [str(i) for i in issues],
            "at": round(time.time(), 3),
        }
        client.hset(REPLICAS, self.name, json.dumps(status))

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._listen()
                delay = 0.5
            except redis.RedisError as e:
                log.warning("policy: Redis subscription lost (%s); retrying in %.1f s", e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            except Exception:  # a bad message must not end the subscription; the old policy stays
                log.exception("policy: update failed; keeping %s", self.holder.policy.name)
                self._stop.wait(delay)

    def _listen(self) -> None:
        pubsub = self._client().pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CHANNEL)
            self.catch_up()  # after subscribing: nothing published in between is missed
            self._ready.set()
            while not self._stop.is_set():
                msg = pubsub.get_message(timeout=0.5)
                if msg is not None and msg.get("type") == "message":
                    self.catch_up()
        finally:
            pubsub.close()
