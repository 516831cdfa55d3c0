"""API keys with roles, and audit-console sessions, stored in Redis.

A key is `fw_` + 32 random bytes (urlsafe base64). Redis holds only its sha256 (hex): a dump of the
database gives nobody a working key. The first 12 hex characters of that hash are the key's public id
(`key_id`), safe to store in audit labels and to show in `keys list`.

Layout (prefix `featurewatch:`):
  auth:keys            hash  sha256(key) -> KeyInfo JSON
  auth:ids             hash  key_id -> sha256(key)          (revoke and list by id)
  auth:session:<h>     str   {"key_id", "csrf"}, h = sha256(session token), expires after the session TTL

A session names its key by id and is resolved through `auth:ids` on every use, so revoking a key ends its
console sessions at once. With `cache_s` > 0 (the sidecar uses 1 s), `lookup` and `any_keys` answers are
kept in-process that long: a key revoked by another process keeps working there for at most `cache_s`;
one revoked through this same store stops at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis

# Also monitor.tenancy.TENANT_RE (the header's rule). Not "-" alone: that is the audit index's name for
# requests without a tenant (monitor.audit_record.NO_TENANT), so such a tenant would read theirs.
TENANT_RE = re.compile(r"^(?!-$)[A-Za-z0-9_.:-]{1,64}$")
TENANT_RULE = "1-64 characters of A-Z a-z 0-9 _ . : - (not '-' alone)"
ROLES = ("client", "reviewer", "admin")
ALL_TENANTS = "*"  # admin keys only: every tenant
KEY_PREFIX = "fw_"
ID_CHARS = 12  # key_id = first 12 hex characters of sha256(key) (48 bits)
NAME_MAX = 64
CACHE_MAX = 10_000  # cached lookups kept before the cache is cleared (bounds memory)

# KEYS: ids, keys. ARGV: key_id, digest, info JSON. 0 when the id is taken (a 48-bit collision).
_CREATE_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


class KeyInputError(ValueError):
    """Bad input for a new key; `field` names what is at fault (role, tenant, name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class KeyStoreUnavailable(redis.RedisError):
    """Redis could not be reached, so no key can be checked (callers answer 503, never 'allowed')."""


@dataclass(frozen=True)
class KeyInfo:
    key_id: str  # first 12 hex of sha256(key): public
    name: str
    role: str  # one of ROLES
    tenants: tuple[str, ...]  # ("*",) = every tenant (admin only)
    created: float  # unix seconds

    def to_json(self, sha256: str) -> str:
        """The stored record: the info and the key's full hash."""
        return json.dumps({**asdict(self), "sha256": sha256}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> KeyInfo:
        d = json.loads(raw)
        return cls(d["key_id"], d["name"], d["role"], tuple(d["tenants"]), float(d["created"]))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def validate(role: str, tenants: tuple[str, ...] | list[str], name: str | None = None) -> tuple[str, ...]:
    """Check a new key's fields; returns the tenants (deduplicated, in order). Raises KeyInputError."""
    if role not in ROLES:
        raise KeyInputError("role", f"{role!r} is not one of {', '.join(ROLES)}")
    uniq = tuple(dict.fromkeys(tenants))
    if not uniq:
        raise KeyInputError("tenant", "at least one tenant is needed ('*' = all tenants, admin keys only)")
    if ALL_TENANTS in uniq:
        if role != "admin":
            raise KeyInputError("tenant", f"'*' (every tenant) is for admin keys only, not {role}")
        if len(uniq) > 1:
            raise KeyInputError("tenant", "'*' already means every tenant; name no others with it")
    bad = [t for t in uniq if t != ALL_TENANTS and not TENANT_RE.match(t)]
    if bad:
        raise KeyInputError("tenant", f"{bad[0]!r}: {TENANT_RULE}")
    if role == "client" and len(uniq) != 1:
        raise KeyInputError(
            "tenant", "a client key has exactly one tenant (its requests are recorded under it)"
        )
    if name is not None and (not name or len(name) > NAME_MAX or not name.isprintable()):
        raise KeyInputError("name", f"1-{NAME_MAX} printable characters")
    return uniq


class KeyStore:
    """Keys and sessions in Redis. `client` is a redis client (decode_responses=True) or a function that
    returns the current one (the sidecar passes its backend's, which may be replaced after an outage);
    `recover` is called once after a connection error, before the single retry."""

    def __init__(
        self,
        client: redis.Redis | Callable[[], redis.Redis],
        prefix: str = "featurewatch:",
        *,
        recover: Callable[[], None] | None = None,
        cache_s: float = 0.0,
    ) -> None:
        if isinstance(client, redis.Redis):
            fixed = client
            self._get: Callable[[], redis.Redis] = lambda: fixed
        else:
            self._get = client
        self.prefix, self._recover, self.cache_s = prefix, recover, cache_s
        self._cache: dict[str, tuple[float, KeyInfo]] = {}  # digest -> (expires, info); found keys only
        self._count: tuple[float, int] | None = None  # (expires, number of keys)

    # ---- keys -----------------------------------------------------------------------------------------
    def create(
        self, role: str, tenants: tuple[str, ...] | list[str], name: str | None = None
    ) -> tuple[str, KeyInfo]:
        """A new key (returned once, never stored) and its info."""
        uniq = validate(role, tenants, name)
        while True:  # a key_id collision (48 bits) only costs another draw
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            h = digest(key)
            # Microseconds, not milliseconds: two keys made within one millisecond (a script, a test)
            # were listed in key-id order rather than oldest first.
            info = KeyInfo(h[:ID_CHARS], name or f"{role}-{h[:ID_CHARS]}", role, uniq, round(time.time(), 6))
            if self._insert(info, h):
                self._count = (0.0, 1)  # expired (the next check asks Redis); keys exist
                return key, info

    def lookup(self, key: str) -> KeyInfo | None:
        """The key's info, or None when it is unknown or revoked."""
        h = digest(key)
        now = time.monotonic()
        hit = self._cache.get(h)
        if hit is not None and hit[0] > now:
            return hit[1]
        info = self._fetch(h)
        if info is None:
            self._cache.pop(h, None)
            return None
        if self.cache_s > 0:
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[h] = (now + self.cache_s, info)
        return info

    def revoke(self, key_id: str) -> bool:
        """Remove a key (and so its sessions). False when no key has that id."""
        h = self._run(lambda c: c.hget(self._ids, key_id))
        if not h:
            return False

        def drop(c: redis.Redis) -> Any:
            with c.pipeline(transaction=True) as pipe:
                pipe.hdel(self._keys, str(h))
                pipe.hdel(self._ids, key_id)
                return pipe.execute()

        self._run(drop)
        self._cache.pop(str(h), None)
        self._count = (0.0, 1)  # expired: the next check asks Redis (until then: assume some remain)
        return True

    def list(self) -> list[KeyInfo]:
        """Every key's info (never the key), oldest first."""
        raws: Any = self._run(lambda c: c.hvals(self._keys))
        return sorted((KeyInfo.from_json(r) for r in raws), key=lambda i: (i.created, i.key_id))

    def any_keys(self) -> bool:
        """Whether at least one key exists (cached like lookups). While Redis is unreachable the last
        answer stands (keys cannot be created in a Redis nobody reaches); with none yet, it raises."""
        now = time.monotonic()
        if self._count is None or self._count[0] <= now:
            try:
                n: Any = self._run(lambda c: c.hlen(self._keys))
            except KeyStoreUnavailable:
                if self._count is None:
                    raise
                return self._count[1] > 0
            self._count = (now + self.cache_s, int(n))
        return self._count[1] > 0

    # ---- console sessions -----------------------------------------------------------------------------
    def create_session(self, info: KeyInfo, ttl_s: int) -> tuple[str, str]:
        """(session token for the cookie, CSRF token for forms); only the token's hash is stored."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        value = json.dumps({"key_id": info.key_id, "csrf": csrf})
        self._run(lambda c: c.set(self._session(token), value, ex=ttl_s))
        return token, csrf

    def session(self, token: str) -> tuple[KeyInfo, str] | None:
        """(the session's key info, its CSRF token), or None when expired, ended or its key revoked."""
        raw = self._run(lambda c: c.get(self._session(token)))
        if not raw:
            return None
        data = json.loads(str(raw))
        h = self._run(lambda c: c.hget(self._ids, data["key_id"]))
        if not h:
            return None
        info = self._fetch(str(h))
        return (info, str(data["csrf"])) if info is not None else None

    def end_session(self, token: str) -> None:
        self._run(lambda c: c.delete(self._session(token)))

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _fetch(self, h: str) -> KeyInfo | None:
        """The key filed under hash `h`. The stored digest is compared again, in constant time, so a
        record filed under the wrong field (a hand edit, a bug) can never authenticate another key."""
        raw = self._run(lambda c: c.hget(self._keys, h))
        if not raw:
            return None
        if not hmac.compare_digest(str(json.loads(str(raw)).get("sha256", "")).encode(), h.encode()):
            return None
        return KeyInfo.from_json(str(raw))

    def _insert(self, info: KeyInfo, h: str) -> bool:
        args = [info.key_id, h, info.to_json(h)]
        return bool(self._run(lambda c: c.eval(_CREATE_LUA, 2, self._ids, self._keys, *args)))

    @property
    def _keys(self) -> str:
        return f"{self.prefix}auth:keys"

    @property
    def _ids(self) -> str:
        return f"{self.prefix}auth:ids"

    def _session(self, token: str) -> str:
        return f"{self.prefix}auth:session:{digest(token)}"

    def _run(self, op: Callable[[redis.Redis], Any]) -> Any:
        """One operation, retried once after `recover` on a connection error; KeyStoreUnavailable after."""
        try:
            return op(self._get())
        except (redis.ConnectionError, redis.TimeoutError) as first:
            if self._recover is None:
                raise KeyStoreUnavailable(f"key store unavailable: {first}") from first
            try:
                self._recover()
                return op(self._get())
            except redis.RedisError as e:
                raise KeyStoreUnavailable(f"key store unavailable: {e}") from e
