"""Per-(rule, tenant) rate limiting of alert deliveries, shared by every replica through Redis.

For each rule an alert names, one key per (consumer group, tenant, rule) holds the stream id of the alert
that owns the current window (`SET … PX window`): an alert is delivered when it wins at least one of its
keys, or already owns it (a retry of the same alert). An alert that wins none is suppressed: acked
without delivery, and a counter per key is incremented. The next delivered alert for that key carries the
count (`suppressed: {rule id: n}`), and the counter is decremented by what was reported only once the
delivery succeeded, so a failed delivery loses no count. Everything happens in Lua scripts, so replicas
consuming the same group never both win a window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from monitor.audit_record import NO_TENANT, Keys

COUNT_TTL_MS = 7 * 86400 * 1000  # an unreported suppressed count is kept a week, then forgotten
NO_RULE = "*"  # key part for an alert that names no rule (should not happen for flag/block)

# KEYS: owner_1, count_1, owner_2, count_2, … ; ARGV: stream id, window ms, count ttl ms.
# Returns {admitted (1/0), n_1, n_2, …}: n_i is the suppressed count reported for rule i when admitted
# and this alert owns that window (0 otherwise).
_ADMIT_LUA = """
local admitted = 0
local owns = {}
for i = 1, #KEYS, 2 do
  local owner = redis.call('GET', KEYS[i])
  if owner == ARGV[1] then
    owns[i] = true
  elseif not owner then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    owns[i] = true
  end
  if owns[i] then admitted = 1 end
end
local out = {admitted}
for i = 1, #KEYS, 2 do
  if admitted == 0 then
    redis.call('INCR', KEYS[i + 1])
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[3])
    out[#out + 1] = 0
  elseif owns[i] then
    out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: count keys; ARGV: how much of each was reported. A counter that reaches 0 is deleted (a DECRBY on
# an expired key would otherwise leave a negative counter without a TTL).
_SETTLE_LUA = """
for i = 1, #KEYS do
  if redis.call('DECRBY', KEYS[i], ARGV[i]) <= 0 then redis.call('DEL', KEYS[i]) end
end
return 1
"""


@dataclass(frozen=True)
class Admission:
    admitted: bool
    suppressed: dict[str, int]  # rule id -> alerts suppressed for it since its last delivery
    count_keys: dict[str, str]  # rule id -> its counter key (settled after a successful delivery)


class Dedup:
    """The shared windows for one consumer group; `window_s` 0 admits everything."""

    def __init__(self, group: str, window_s: float, keys: Keys | None = None) -> None:
        self.group, self.window_ms = group, int(window_s * 1000)
        self.keys = keys or Keys()
        self._admit: dict[int, Any] = {}  # id(client) -> registered script
        self._settle: dict[int, Any] = {}

    def _key(self, kind: str, tenant: str, rule: str) -> str:
        return f"{self.keys.alerts}:{kind}:{self.group}:{tenant or NO_TENANT}:{rule}"

    def admit(self, client: redis.Redis, stream_id: str, tenant: str, rules: list[str]) -> Admission:
        if self.window_ms <= 0:
            return Admission(True, {}, {})
        rules = sorted(set(rules)) or [NO_RULE]
        keys: list[str] = []
        for r in rules:
            keys += [self._key("dedup", tenant, r), self._key("suppressed", tenant, r)]
        script = _script(self._admit, client, _ADMIT_LUA)
        out = script(keys=keys, args=[stream_id, self.window_ms, COUNT_TTL_MS], client=client)
        counts = {r: int(n) for r, n in zip(rules, out[1:], strict=True) if int(n) > 0}
        return Admission(bool(int(out[0])), counts, {r: keys[2 * i + 1] for i, r in enumerate(rules)})

    def settle(self, pipe: Any, client: redis.Redis, adm: Admission) -> None:
        """Queue, on `pipe`, the decrement of the counts `adm` reported (after a successful delivery)."""
        if not adm.suppressed:
            return
        script = _script(self._settle, client, _SETTLE_LUA)
        rules = sorted(adm.suppressed)
        script(keys=[adm.count_keys[r] for r in rules], args=[adm.suppressed[r] for r in rules], client=pipe)


def _script(cache: dict[int, Any], client: redis.Redis, source: str) -> Any:
    script = cache.get(id(client))
    if script is None:
        script = cache[id(client)] = client.register_script(source)
    return script
