"""Access control: the key store on a real (embedded) Redis, and roles enforced over real HTTP (uvicorn on
loopback, the `openai` client and httpx) on the tiny model with the audit trail on."""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import Depends, FastAPI, Request
from fw_testing import free_port, make_settings, policy_text, rule, running
from pydantic import SecretStr

from monitor.auth import SESSION_COOKIE, Principal, require
from monitor.keystore import KeyInputError, KeyStore
from monitor.store_backends import EmbeddedBackend

CHAT = [{"role": "user", "content": "Say something."}]


# ---- the key store -------------------------------------------------------------------------------------
@pytest.fixture
def backend(tmp_path: Path) -> Iterator[EmbeddedBackend]:
    b = EmbeddedBackend(tmp_path / "data" / "audit.rdb")
    yield b
    b.close()


@pytest.fixture
def store(backend: EmbeddedBackend) -> KeyStore:
    return KeyStore(backend.client())


def test_keys_are_stored_only_as_hashes(store: KeyStore, backend: EmbeddedBackend) -> None:
    key, info = store.create("reviewer", ["acme", "globex"], "ana")
    assert key.startswith("fw_") and len(key) >= 40
    h = hashlib.sha256(key.encode()).hexdigest()
    assert info.key_id == h[:12] and info.name == "ana" and info.role == "reviewer"
    assert info.tenants == ("acme", "globex") and abs(info.created - time.time()) < 60
    client = backend.client()
    dump = " ".join(f"{k} {client.dump(k)!r}" for k in client.scan_iter("*"))
    assert key not in dump and key[3:20] not in dump and h in str(client.hkeys("featurewatch:auth:keys"))
    assert store.lookup(key) == info and store.lookup(key + "x") is None and store.lookup("") is None
    assert [i.key_id for i in store.list()] == [info.key_id]


def test_revoke_and_list(store: KeyStore) -> None:
    k1, i1 = store.create("client", ["acme"])
    k2, i2 = store.create("admin", ["*"], "root")
    assert [i.key_id for i in store.list()] == [i1.key_id, i2.key_id] and i1.name == f"client-{i1.key_id}"
    assert store.revoke(i1.key_id) and not store.revoke(i1.key_id) and not store.revoke("000000000000")
    assert store.lookup(k1) is None and store.lookup(k2) == i2 and store.list() == [i2]
    assert store.any_keys()
    store.revoke(i2.key_id)
    assert not store.any_keys()


@pytest.mark.parametrize(
    ("role", "tenants", "name", "field"),
    [
        ("boss", ["acme"], None, "role"),
        ("reviewer", ["bad tenant!"], None, "tenant"),
        ("reviewer", [], None, "tenant"),
        ("reviewer", ["*"], None, "tenant"),  # every tenant: admin keys only
        ("admin", ["*", "acme"], None, "tenant"),
        ("client", ["acme", "globex"], None, "tenant"),  # a client's requests have one tenant
        ("client", ["acme"], "x" * 65, "name"),
    ],
)
def test_bad_input_names_the_field(
    store: KeyStore, role: str, tenants: list[str], name: str | None, field: str
) -> None:
    with pytest.raises(KeyInputError) as e:
        store.create(role, tenants, name)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")
    assert store.list() == []


def test_lookup_compares_the_stored_digest_in_constant_time(
    store: KeyStore, backend: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, info = store.create("client", ["acme"])
    h = hashlib.sha256(key.encode()).hexdigest()
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr("monitor.keystore.hmac.compare_digest", spy)
    assert store.lookup(key) == info
    assert seen == [(h.encode(), h.encode())]
    # a record filed under another key's hash (a hand edit) never authenticates that other key
    other = "fw_" + "x" * 43
    client = backend.client()
    client.hset("featurewatch:auth:keys", hashlib.sha256(other.encode()).hexdigest(), client.hget(
        "featurewatch:auth:keys", h
    ))  # fmt: skip
    assert store.lookup(other) is None


def test_sessions_follow_their_key(store: KeyStore, backend: EmbeddedBackend) -> None:
    _, info = store.create("reviewer", ["acme"])
    token, csrf = store.create_session(info, ttl_s=60)
    assert store.session(token) == (info, csrf) and store.session(token + "x") is None
    assert token not in " ".join(backend.client().keys("*"))  # stored by hash
    assert (
        0
        < backend.client().ttl(f"featurewatch:auth:session:{hashlib.sha256(token.encode()).hexdigest()}")
        <= 60
    )  # type: ignore[operator]
    store.end_session(token)
    assert store.session(token) is None
    token2, _ = store.create_session(info, ttl_s=60)
    store.revoke(info.key_id)
    assert store.session(token2) is None  # revoking the key ends its sessions


def test_cached_lookups_see_a_revocation_within_the_cache_time(backend: EmbeddedBackend) -> None:
    cached = KeyStore(backend.client, cache_s=0.5)
    other = KeyStore(backend.client())  # another process, e.g. `featurewatch keys revoke`
    key, info = other.create("client", ["acme"])
    assert cached.lookup(key) == info
    other.revoke(info.key_id)
    t0 = time.monotonic()
    while cached.lookup(key) is not None:
        time.sleep(0.02)
    assert time.monotonic() - t0 <= 1.0
    key2, info2 = cached.create("client", ["acme"])
    assert cached.lookup(key2) == info2
    cached.revoke(info2.key_id)
    assert cached.lookup(key2) is None  # revoked through this store: at once


def test_a_restarted_embedded_server_is_found_again(backend: EmbeddedBackend) -> None:
    keys = KeyStore(backend.client, recover=backend.recover)
    key, info = keys.create("client", ["acme"])
    os.kill(backend.client().pid, signal.SIGKILL)  # type: ignore[attr-defined]
    time.sleep(0.1)
    assert keys.lookup(key) == info  # recovered (same database, new server) and retried once
    assert backend.owner


def test_principal_permissions_and_tenants() -> None:
    admin = Principal("a" * 12, "root", "admin", ("*",))
    rev = Principal("b" * 12, "ana", "reviewer", ("acme", "globex"))
    client = Principal("c" * 12, "app", "client", ("acme",))
    assert admin.can("policy:write") and admin.can("infer") and admin.can("keys:admin")
    assert rev.can("audit:read") and rev.can("audit:label") and not rev.can("infer")
    assert not rev.can("policy:write") and client.can("infer") and not client.can("audit:read")
    assert admin.sees("anyone") and admin.sees(None) and admin.tenant_filter() is None
    assert rev.sees("globex") and not rev.sees("initech") and not rev.sees(None)
    assert rev.tenant_filter() == ("acme", "globex")


# ---- over HTTP -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from monitor.runtime import load_runtime

    policy = tmp_path_factory.mktemp("auth") / "policy.yaml"
    policy.write_text(policy_text(rule("flag-all", "always", "flag")))  # every request is recorded
    rt = load_runtime(make_settings(tiny_model_dir, tiny_sae_dir, policy))
    yield rt
    rt.close()


@contextmanager
def _serve(runtime: Any, data: Path, **settings: Any) -> Iterator[Any]:
    """A sidecar with its own data dir (own Redis, audit trail on) and a probe route per permission."""
    from monitor.server import create_app

    update = {"data_dir": data, "otel_exporter": "none", **settings}
    app = create_app(runtime.settings.model_copy(update=update), runtime)
    _probes(app)
    with running(app) as url:
        yield type("Sidecar", (), {"url": url, "app": app, "keys": app.state.keys})


@pytest.fixture
def sidecar(runtime: Any, tmp_path: Path) -> Iterator[Any]:
    with _serve(runtime, tmp_path / "data") as s:
        yield s


def _probes(app: FastAPI) -> None:
    for perm in ("audit:read", "audit:label", "policy:write"):
        needs = Depends(require(perm))

        async def probe(request: Request, p: Principal = needs) -> dict[str, Any]:
            body = (await request.body()).decode()  # still readable after a CSRF check on a form
            return {"key_id": p.key_id, "role": p.role, "tenants": list(p.tenants), "body": body}

        app.add_api_route(f"/probe/{perm}", probe, methods=["GET", "POST"])


def _oai(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def _chat(url: str, key: str = "unused", **headers: str) -> Any:
    with _oai(url, key) as c:
        return c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=2, temperature=0, extra_headers=headers or None
        )


def test_without_keys_inference_is_open_and_audit_routes_say_how_to_start(sidecar: Any) -> None:
    resp = _chat(sidecar.url, **{"x-featurewatch-tenant": "acme"})  # the openai client sends a Bearer
    assert sidecar.app.state.audit.flush()
    assert sidecar.app.state.audit.get(resp.id)["tenant"] == "acme"
    r = httpx.get(sidecar.url.removesuffix("/v1") + "/probe/audit:read")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "featurewatch keys create --role admin --tenant '*'" in r.json()["error"]["message"]
    r = httpx.get(sidecar.url.removesuffix("/v1") + "/probe/audit:read", headers=_bearer("fw_nothing"))
    assert r.status_code == 401 and "keys create" in r.json()["error"]["message"]


def test_inference_needs_a_key_with_the_right_role(sidecar: Any) -> None:
    keys: KeyStore = sidecar.keys
    client_key, _ = keys.create("client", ["acme"], "acme-app")
    reviewer_key, _ = keys.create("reviewer", ["acme"])
    for key in ("unused", client_key + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            _chat(sidecar.url, key)
        assert e.value.status_code == 401 and "API key" in str(e.value)
        with _oai(sidecar.url, key) as c, pytest.raises(openai.AuthenticationError):
            c.models.list()
    r = httpx.get(f"{sidecar.url}/models")  # no Authorization header at all
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        _chat(sidecar.url, reviewer_key)
    assert denied.value.status_code == 403 and "reviewer" in str(denied.value)
    with _oai(sidecar.url, reviewer_key) as c, pytest.raises(openai.PermissionDeniedError):
        c.models.list()
    with _oai(sidecar.url, client_key) as c:
        assert [m.id for m in c.models.list()] == ["tiny"]
    # a client key's requests are recorded under its tenant, whatever header it sends
    resp = _chat(sidecar.url, client_key, **{"x-featurewatch-tenant": "globex"})
    store = sidecar.app.state.audit
    assert store.flush() and store.get(resp.id)["tenant"] == "acme"
    assert [r["id"] for r in store.list(tenant="globex")] == []


def test_admin_names_the_tenant_and_revoked_keys_stop_working(sidecar: Any) -> None:
    keys: KeyStore = sidecar.keys
    admin_key, _ = keys.create("admin", ["*"])
    acme_admin, _ = keys.create("admin", ["acme"])
    client_key, client_info = keys.create("client", ["acme"])
    store = sidecar.app.state.audit
    resp = _chat(sidecar.url, admin_key, **{"x-featurewatch-tenant": "globex"})
    untenanted = _chat(sidecar.url, admin_key)
    assert store.flush() and store.get(resp.id)["tenant"] == "globex"
    assert store.get(untenanted.id)["tenant"] is None
    with pytest.raises(openai.PermissionDeniedError):  # an admin of acme cannot act for globex
        _chat(sidecar.url, acme_admin, **{"x-featurewatch-tenant": "globex"})
    assert _chat(sidecar.url, client_key).id
    keys.revoke(client_info.key_id)
    with pytest.raises(openai.AuthenticationError):
        _chat(sidecar.url, client_key)


def test_key_revoked_by_another_process_stops_within_two_seconds(sidecar: Any) -> None:
    sidecar.keys.create("admin", ["*"])  # revoking the last key would reopen inference (no keys: open)
    key, info = sidecar.keys.create("client", ["acme"])
    assert _chat(sidecar.url, key).id
    KeyStore(sidecar.app.state.audit.backend.client()).revoke(info.key_id)  # what `keys revoke` does
    t0 = time.monotonic()
    while True:
        try:
            _chat(sidecar.url, key)
        except openai.AuthenticationError:
            break
        assert time.monotonic() - t0 < 2.0, "a revoked key still works after 2 s"
        time.sleep(0.05)


def test_static_api_keys_are_client_keys(
    runtime: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    static = "static-key-0123456789"
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(
        "monitor.auth.hmac.compare_digest", lambda a, b: compared.append((a, b)) or real(a, b)
    )
    with _serve(runtime, tmp_path / "data", api_keys={static: "acme", "other-key-0123456789": "globex"}) as s:
        with pytest.raises(openai.AuthenticationError):  # no key in Redis, but static keys are set
            _chat(s.url)
        resp = _chat(s.url, static, **{"x-featurewatch-tenant": "globex"})
        assert s.app.state.audit.flush() and s.app.state.audit.get(resp.id)["tenant"] == "acme"
        r = httpx.get(s.url.removesuffix("/v1") + "/probe/audit:read", headers=_bearer(static))
        assert r.status_code == 403  # a client key, audit needs reviewer or admin
    h = hashlib.sha256(static.encode()).hexdigest().encode()
    assert compared and all(len(a) == len(b) == 64 for a, b in compared) and (h, h) in compared


def test_keys_that_cannot_be_checked_get_503(runtime: Any, tmp_path: Path) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with _serve(runtime, tmp_path / "data", redis_url=SecretStr(down)) as s:
        with pytest.raises(openai.InternalServerError) as e:
            _chat(s.url)
        assert e.value.status_code == 503 and "key store" in str(e.value)
        r = httpx.get(s.url.removesuffix("/v1") + "/probe/audit:read", headers=_bearer("fw_something"))
        assert r.status_code == 503


def test_audit_permissions_by_role(sidecar: Any) -> None:
    keys: KeyStore = sidecar.keys
    base = sidecar.url.removesuffix("/v1")
    admin_key, _ = keys.create("admin", ["*"])
    reviewer_key, reviewer = keys.create("reviewer", ["acme", "globex"])
    client_key, _ = keys.create("client", ["acme"])

    def status(path: str, key: str | None) -> int:
        return httpx.get(f"{base}/probe/{path}", headers=_bearer(key) if key else {}).status_code

    assert status("audit:read", None) == 401 and status("audit:read", "fw_wrong") == 401
    assert status("audit:read", client_key) == 403 and status("audit:label", client_key) == 403
    assert status("audit:read", reviewer_key) == 200 and status("audit:label", reviewer_key) == 200
    assert status("policy:write", reviewer_key) == 403 and status("policy:write", admin_key) == 200
    r = httpx.get(f"{base}/probe/audit:read", headers=_bearer(reviewer_key)).json()
    assert r == {"key_id": reviewer.key_id, "role": "reviewer", "tenants": ["acme", "globex"], "body": ""}
    err = httpx.get(f"{base}/probe/audit:read", headers=_bearer(client_key)).json()["error"]
    assert err["type"] == "permission_error" and "audit:read" in err["message"]


def test_console_session_cookie_needs_csrf_on_writes(sidecar: Any) -> None:
    keys: KeyStore = sidecar.keys
    base = sidecar.url.removesuffix("/v1")
    _, info = keys.create("reviewer", ["acme"])
    token, csrf = keys.create_session(info, ttl_s=60)
    with httpx.Client(base_url=base, cookies={SESSION_COOKIE: token}) as c:
        assert c.get("/probe/audit:read").json()["key_id"] == info.key_id
        assert c.post("/probe/audit:label", data={"label": "ok"}).status_code == 403  # no CSRF token
        assert c.post("/probe/audit:label", data={"label": "ok", "csrf": "wrong"}).status_code == 403
        form = c.post("/probe/audit:label", data={"label": "ok", "csrf": csrf})
        assert form.status_code == 200 and form.json()["body"] == f"label=ok&csrf={csrf}"
        assert c.post("/probe/audit:label", json={}, headers={"x-csrf-token": csrf}).status_code == 200
        assert c.get("/probe/policy:write").status_code == 403  # a reviewer's session is still a reviewer
        keys.end_session(token)
        assert c.get("/probe/audit:read").status_code == 401


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}
