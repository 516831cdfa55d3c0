"""Per-conversation risk state shared by every replica: each turn's detector scores, in Redis.

A request names its conversation with the `x-featurewatch-conversation` header or OpenAI's
`metadata.conversation_id` (1-128 characters of A-Z a-z 0-9 _ . = + / -; both given must agree). State is
per tenant: one list `featurewatch:conv:<tenant>:<id>` (tenant `-` for none; the id has no `:`, so the
key is unambiguous) of JSON turns `{"request_id", "at", "scores": {detector: score}}`, oldest first,
where a turn's score is the detector's own aggregation over that turn's completion (the response's
`scores`). Only turns that generated at least one scored token are stored.

- Before generating, the route loads the turns (`load`, off the event loop) and hands them to the
  request's monitor, so the pure evaluator sees them (`policies.conversation`).
- After the turn, `append` pushes it, trims the list to the newest `max_turns` and renews the TTL in one
  Lua script: atomic, so turns finishing at once on several replicas are all kept (in finishing order).
- Loading fails (Redis unreachable): the monitor gets a `History` with an `error`, and every conversation
  rule fails closed through the policy's `action_on_detector_error`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.audit_record import NO_TENANT
from monitor.http_errors import APIError

log = logging.getLogger("featurewatch.conversation")
HEADER = "x-featurewatch-conversation"
METADATA_KEY = "conversation_id"
ID_RE = re.compile(r"^[A-Za-z0-9_.=+/-]{1,128}$")
PREFIX = "featurewatch:conv:"

# KEYS: the conversation's list. ARGV: turn JSON, max turns, TTL (s). Returns the turns now held.
_APPEND_LUA = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('LLEN', KEYS[1])
"""


@dataclass(frozen=True)
class History:
    """A conversation's earlier turns (each {detector: score}), or why they could not be loaded."""

    id: str
    turns: tuple[Mapping[str, float], ...] = ()
    error: str | None = None

    def scores(self) -> dict[str, tuple[float, ...]]:
        """Per detector, its score in each earlier turn that scored it, oldest first."""
        out: dict[str, list[float]] = {}
        for turn in self.turns:
            for name, value in turn.items():
                out.setdefault(name, []).append(value)
        return {name: tuple(values) for name, values in out.items()}


def conversation_id(headers: Mapping[str, str], metadata: Mapping[str, str] | None) -> str | None:
    """The request's conversation id (None when it names none); 400 when malformed or contradictory."""
    header = headers.get(HEADER)
    meta = (metadata or {}).get(METADATA_KEY)
    for where, raw in ((HEADER, header), (f"metadata.{METADATA_KEY}", meta)):
        if raw is not None and not ID_RE.match(raw):
            raise APIError(400, f"{where}: 1-128 characters of A-Z a-z 0-9 _ . = + / -", param=where)
    if header is not None and meta is not None and header != meta:
        raise APIError(400, f"{HEADER} and metadata.{METADATA_KEY} name different conversations")
    return header if header is not None else meta


def key(tenant: str | None, conv_id: str) -> str:
    return f"{PREFIX}{tenant or NO_TENANT}:{conv_id}"


@dataclass
class ConversationStore:
    """Loads and appends turns; `client` returns the current Redis client (decode_responses=True)."""

    client: Callable[[], redis.Redis]
    ttl_s: int = 86400
    max_turns: int = 50
    _scripts: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def load(self, tenant: str | None, conv_id: str) -> History:
        """The newest `max_turns` earlier turns. Raises redis.RedisError when Redis cannot be reached."""
        raws: Any = self.client().lrange(key(tenant, conv_id), -self.max_turns, -1)
        turns = [t for t in (_parse(r) for r in raws) if t is not None]
        return History(conv_id, tuple(turns))

    def append(self, tenant: str | None, conv_id: str, request_id: str, scores: Mapping[str, float]) -> int:
        """Store one finished turn; returns how many turns the conversation now holds."""
        turn = {"request_id": request_id, "at": round(time.time(), 3), "scores": dict(scores)}
        client = self.client()
        script = self._scripts.get(id(client))
        if script is None:
            script = self._scripts[id(client)] = client.register_script(_APPEND_LUA)
        text = json.dumps(turn, separators=(",", ":"))
        return int(script(keys=[key(tenant, conv_id)], args=[text, self.max_turns, self.ttl_s]))


def _parse(raw: str) -> dict[str, float] | None:
    try:
        scores = json.loads(raw)["scores"]
        return {str(k): float(v) for k, v in scores.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("conversation state: skipped a malformed turn entry")
        return None
