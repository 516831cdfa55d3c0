"""What the audit store does in Redis: the idempotent write script with its inputs, and the read API.

One Lua script per record, keyed by its request id: `SET NX` the JSON document (with a TTL), and only if
that succeeded the time indexes (all tenants and per tenant), the tenant set and, for flag/block, an entry
on the alerts stream. Writing the same id twice therefore changes nothing (spool replay relies on it).
"""

from __future__ import annotations

import builtins
import json
from typing import Any

import redis

from monitor.audit_record import ALERT_VERDICTS, NO_TENANT, Keys, alert_fields
from monitor.store_backends import Backend

# KEYS: record, by_time, tenant_by_time, tenants, alerts.
# ARGV: json, score (started_at, unix s), id, ttl_s (0 = none), alert (1/0), stream maxlen, tenant, then the
# alert entry's field/value pairs. Returns 1 when written, 0 when the id was already there.
WRITE_LUA = """
local ttl = tonumber(ARGV[4])
local ok
if ttl > 0 then
  ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ttl)
else
  ok = redis.call('SET', KEYS[1], ARGV[1], 'NX')
end
if not ok then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[7])
if ttl > 0 then
  local cutoff = '(' .. tostring(tonumber(ARGV[2]) - ttl)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cutoff)
end
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 8))
end
return 1
"""


def script_input(rec: dict[str, Any], k: Keys, ttl_s: int, stream_maxlen: int) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of `WRITE_LUA` for one record."""
    keys = [k.record(rec["id"]), k.by_time, k.tenant_by_time(rec["tenant"]), k.tenants, k.alerts]
    args: list[Any] = [
        json.dumps(rec, separators=(",", ":"), ensure_ascii=False),
        rec.get("started_at", rec["created"]),  # index score: sub-second, so one second's records keep order
        rec["id"],
        ttl_s,
        1 if rec["verdict"] in ALERT_VERDICTS else 0,
        stream_maxlen,
        rec["tenant"] or NO_TENANT,
    ]
    for field, value in alert_fields(rec).items():
        args += [field, value]
    return keys, args


class AuditReads:
    """The read API of `monitor.store.AuditStore` (console, CLI, tests); needs `backend` and `keys`."""

    backend: Backend
    keys: Keys

    def _client(self) -> redis.Redis:
        return self.backend.client()

    def get(self, request_id: str) -> dict[str, Any] | None:
        raw: Any = self._client().get(self.keys.record(request_id))
        return json.loads(raw) if raw else None

    def list(
        self,
        tenant: str | None = None,
        start: float | None = None,
        end: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> builtins.list[dict[str, Any]]:
        """Records created in [start, end] (unix s), newest first, for one tenant or all."""
        key = self.keys.tenant_by_time(tenant) if tenant is not None else self.keys.by_time
        client = self._client()
        hi = "+inf" if end is None else end
        lo = "-inf" if start is None else start
        ids: Any = client.zrevrangebyscore(key, hi, lo, start=offset, num=limit)
        if not ids:
            return []
        raws: Any = client.mget([self.keys.record(str(i)) for i in ids])
        return [json.loads(r) for r in raws if r]  # an expired record's index entry is skipped

    def alerts(self, count: int = 100) -> builtins.list[dict[str, str]]:
        """The latest `count` alerts, oldest first, each with its `stream_id`."""
        entries: Any = self._client().xrevrange(self.keys.alerts, count=count)
        return [{"stream_id": str(sid), **fields} for sid, fields in reversed(entries or [])]

    def tenants(self) -> builtins.list[str]:
        members: Any = self._client().smembers(self.keys.tenants)
        return sorted(str(t) for t in members)
