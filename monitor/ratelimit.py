"""Rate limits shared by every replica: requests and tokens per minute, per tenant and per API key, in Redis.

Algorithm: GCRA (the generic cell rate algorithm, a leaky bucket kept as one timestamp per limit). A
limit of N per minute admits a burst of N, then refills continuously at N/60 per second; `Retry-After`
is the time until the refused request would fit, rounded up to whole seconds. Each limit's key holds
its theoretical arrival time (TAT, microseconds of Redis server time, so replicas with skewed clocks
agree) and expires once the bucket is full again, so idle tenants cost no memory.

- Requests (`rpm`): checked and charged one request at admission, atomically for every limit the
  request falls under (a refusal by one limit charges none).
- Tokens (`tpm`): prompt + completion tokens are only known after the request, so admission checks that
  at least one token of the minute's budget is left and `charge` adds the request's tokens when it ends;
  the request that crosses the limit finishes, the next one is refused until the bucket drains.

Keys: `featurewatch:ratelimit:<rpm|tpm>:<tenant|key>:<name>` (the name last: a tenant may contain `:`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from monitor.audit_record import NO_TENANT

PREFIX = "featurewatch:ratelimit:"
WINDOW_US = 60_000_000  # limits are per minute
Unit = Literal["rpm", "tpm"]
UNIT_WORDS = {"rpm": "requests per minute", "tpm": "tokens per minute"}

# KEYS: one TAT key per limit. ARGV: per limit, (interval µs, charge now). A limit admits when one more
# unit fits in the window. Returns {0, 0} when all admit (and charges them), else {i, wait µs} for the
# first limit that refuses (nothing charged). Numbers are written with %.0f: Lua's tostring would print
# a 16-digit µs timestamp in exponent form and lose precision.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or now), now)
  local wait = tat + interval - window - now
  if wait > 0 then return {i, math.ceil(wait)} end
  tats[i] = tat
end
for i = 1, #KEYS do
  local charge = tonumber(ARGV[2 * i])
  if charge > 0 then
    local tat = tats[i] + charge * tonumber(ARGV[2 * i - 1])
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end
return {0, 0}
"""

# KEYS: TAT keys. ARGV: per limit, (interval µs, units used). Adds the units, however far over.
_CHARGE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or now), now)
  tat = tat + tonumber(ARGV[2 * i]) * tonumber(ARGV[2 * i - 1])
  redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
return 1
"""


@dataclass(frozen=True)
class Limit:
    """One bucket: `per_minute` units of `unit` for one tenant or API key."""

    unit: Unit
    scope: Literal["tenant", "key"]
    name: str  # the tenant (NO_TENANT for none) or the key id
    per_minute: int

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.unit}:{self.scope}:{self.name}"

    @property
    def interval_us(self) -> float:
        return WINDOW_US / self.per_minute

    def describe(self) -> str:
        who = f"tenant {self.name!r}" if self.scope == "tenant" else f"API key {self.name}"
        return f"{UNIT_WORDS[self.unit]} ({self.unit}) for {who}: {self.per_minute}"


@dataclass(frozen=True)
class Refusal:
    limit: Limit
    retry_after_s: int  # whole seconds, at least 1


@dataclass(frozen=True)
class Quota:
    """Per-minute limits; 0 = none. `tenants` overrides rpm/tpm for some tenants."""

    rpm: int = 0
    tpm: int = 0
    key_rpm: int = 0
    key_tpm: int = 0
    tenants: Mapping[str, Mapping[str, int | None]] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        counts = [self.rpm, self.tpm, self.key_rpm, self.key_tpm]
        counts += [v or 0 for o in self.tenants.values() for v in o.values()]
        return any(c > 0 for c in counts)

    def limits(self, tenant: str | None, key_id: str | None) -> list[Limit]:
        """The buckets a request of this tenant (and key, when one is used) falls under."""
        name = tenant or NO_TENANT
        over = self.tenants.get(name, {})
        rpm, tpm = over.get("rpm"), over.get("tpm")
        out = [
            Limit("rpm", "tenant", name, self.rpm if rpm is None else rpm),
            Limit("tpm", "tenant", name, self.tpm if tpm is None else tpm),
        ]
        if key_id is not None:
            out += [Limit("rpm", "key", key_id, self.key_rpm), Limit("tpm", "key", key_id, self.key_tpm)]
        return [lim for lim in out if lim.per_minute > 0]


class RateLimiter:
    """GCRA buckets in Redis; `client` returns the current client. Methods raise redis.RedisError when
    Redis cannot be reached (the caller decides: fail open or closed)."""

    def __init__(self, client: Callable[[], redis.Redis], quota: Quota) -> None:
        self.client, self.quota = client, quota
        self._scripts: dict[tuple[int, str], Any] = {}

    def admit(self, limits: list[Limit]) -> Refusal | None:
        """Charge one request to every rpm limit, or to none and say which limit refused and for how long."""
        if not limits:
            return None
        args: list[Any] = []
        for lim in limits:
            args += [repr(lim.interval_us), 1 if lim.unit == "rpm" else 0]
        i, wait_us = self._script(_ADMIT_LUA)(keys=[lim.key for lim in limits], args=args)
        if int(i) == 0:
            return None
        return Refusal(limits[int(i) - 1], max(1, math.ceil(int(wait_us) / 1_000_000)))

    def charge(self, limits: list[Limit], tokens: int) -> None:
        """Add a finished request's tokens to its tpm limits."""
        tpm = [lim for lim in limits if lim.unit == "tpm"]
        if not tpm or tokens <= 0:
            return
        args: list[Any] = []
        for lim in tpm:
            args += [repr(lim.interval_us), tokens]
        self._script(_CHARGE_LUA)(keys=[lim.key for lim in tpm], args=args)

    def _script(self, source: str) -> Any:
        client = self.client()
        script = self._scripts.get((id(client), source))
        if script is None:
            script = self._scripts[(id(client), source)] = client.register_script(source)
        return script
