"""`featurewatch keys …` as an operator runs it, and the embedded Redis shared by CLI and sidecar: one
server per database, whoever starts first (no second redis-server on the same append-only file)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fw_testing import make_settings, policy_text, redis_servers, rule, running
from typer.testing import CliRunner

from monitor.cli import app
from monitor.keystore import KeyStore
from monitor.redis_conn import open_redis
from monitor.settings import Settings
from monitor.store_backends import EmbeddedBackend, EmbeddedServer

runner = CliRunner()
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _keys(*args: str) -> Any:
    return runner.invoke(app, ["keys", *args])


def test_create_prints_the_key_alone_on_the_last_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    res = _keys("create", "--role", "reviewer", "--tenant", "acme", "--tenant", "globex", "--name", "ana",
                "--data-dir", str(data))  # fmt: skip
    assert res.exit_code == 0, res.output
    key = res.stdout.splitlines()[-1]
    assert res.stdout == key + "\n" and key.startswith("fw_") and key not in res.stderr
    with open_redis(Settings(data_dir=data)) as client:
        info = KeyStore(client).lookup(key)
    assert info is not None and info.role == "reviewer" and info.tenants == ("acme", "globex")
    assert info.key_id in res.stderr and info.name == "ana"
    assert redis_servers(data) == []  # the command stopped the server it started


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--role", "boss", "--tenant", "acme"], "role"),
        (["--role", "client", "--tenant", "no spaces"], "tenant"),
        (["--role", "client", "--tenant", "a", "--tenant", "b"], "tenant"),
        (["--role", "reviewer", "--tenant", "*"], "tenant"),
    ],
)
def test_bad_input_exits_2_naming_the_field(tmp_path: Path, args: list[str], field: str) -> None:
    res = _keys("create", *args, "--data-dir", str(tmp_path / "data"))
    assert res.exit_code == 2 and f"{field}:" in res.stderr and res.stdout == ""
    assert not (tmp_path / "data" / "audit.rdb.lock").exists()  # rejected before Redis was touched


def test_bad_settings_exit_2(tmp_path: Path) -> None:
    res = _keys("list", "--config", str(tmp_path / "missing.yaml"))
    assert res.exit_code == 2 and "config:" in res.stderr


def test_list_never_shows_keys_and_revoke_works(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    k1 = _keys("create", "--role", "admin", "--tenant", "*", *data).stdout.strip()
    k2 = _keys("create", "--role", "client", "--tenant", "acme", "--name", "app", *data).stdout.strip()
    listed = _keys("list", *data)
    assert listed.exit_code == 0 and k1 not in listed.output and k2 not in listed.output
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]  # id role date time tenants name
    assert (
        [r[1] for r in rows] == ["admin", "client"] and rows[0][4] == "*" and rows[1][4:] == ["acme", "app"]
    )
    client_id = rows[1][0]
    assert _keys("revoke", client_id, *data).exit_code == 0
    assert client_id not in _keys("list", *data).stdout
    missing = _keys("revoke", client_id, *data)
    assert missing.exit_code == 1 and "key_id:" in missing.stderr


# ---- CLI and sidecar share one embedded server -----------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path, tiny_sae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from monitor.runtime import load_runtime

    policy = tmp_path_factory.mktemp("cli-keys") / "policy.yaml"
    policy.write_text(policy_text(rule("flag-all", "always", "flag")))
    rt = load_runtime(make_settings(tiny_model_dir, tiny_sae_dir, policy))
    yield rt
    rt.close()


def test_cli_uses_the_running_sidecars_server(runtime: Any, tmp_path: Path) -> None:
    from monitor.server import create_app

    data = tmp_path / "data"
    settings = runtime.settings.model_copy(update={"data_dir": data, "otel_exporter": "none"})
    sidecar = create_app(settings, runtime)
    with running(sidecar) as url:
        backend = sidecar.state.audit.backend
        assert backend.owner and redis_servers(data) == [backend.client().pid]
        assert httpx.post(f"{url}/chat/completions", json=CHAT).status_code == 200  # no keys yet: open
        cli = Path(sys.executable).parent / "featurewatch"
        proc = subprocess.run(
            [str(cli), "keys", "create", "--role", "client", "--tenant", "acme", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        key = proc.stdout.splitlines()[-1]
        assert redis_servers(data) == [backend.client().pid]  # the CLI used the sidecar's server
        # the sidecar learns that keys exist within its cache time (1 s), then requires one
        deadline = time.monotonic() + 2.0
        while httpx.post(f"{url}/chat/completions", json=CHAT).status_code != 401:
            assert time.monotonic() < deadline, "inference still open 2 s after a key was created"
            time.sleep(0.05)
        ok = httpx.post(f"{url}/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        audit = sidecar.state.audit
        assert audit.flush() and audit.get(ok.json()["id"])["tenant"] == "acme"
        # an in-process command while the sidecar runs: a guest of the same server, which it leaves running
        assert _keys("list", "--data-dir", str(data)).exit_code == 0
        assert backend.client().ping() and redis_servers(data) == [backend.client().pid]
    assert redis_servers(data) == []


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data" / "audit.rdb"
    yield path
    assert redis_servers(path.parent) == []  # nothing left running


def test_sidecar_waits_for_a_short_cli_command_then_owns_the_server(db: Path) -> None:
    cli = EmbeddedServer.open(db, cli=True)
    cli.client.set("from-cli", "1")
    threading.Timer(0.5, cli.close).start()  # the command ends
    sidecar = EmbeddedBackend(db)
    t0 = time.monotonic()
    try:
        assert sidecar.client().get("from-cli") == "1"
        assert sidecar.owner and time.monotonic() - t0 >= 0.4
        assert redis_servers(db.parent) == [sidecar.client().pid]  # type: ignore[attr-defined]
    finally:
        sidecar.close()


def test_sidecar_joins_a_long_cli_command_and_takes_over_after_it(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("monitor.store_backends.CLI_WAIT_S", 0.2)
    cli = EmbeddedServer.open(db, cli=True)
    sidecar = EmbeddedBackend(db)
    try:
        sidecar.client().set("from-sidecar", "1")  # a guest on the command's server
        assert not sidecar.owner and cli.client.get("from-sidecar") == "1"
        assert len(redis_servers(db.parent)) == 1
        cli.close()  # the command ends and stops its server
        sidecar.recover()  # what the audit writer (and the key store) do after a failed command
        assert sidecar.client().get("from-sidecar") == "1"  # same database, now the sidecar's server
        assert sidecar.owner and len(redis_servers(db.parent)) == 1
    finally:
        cli.close()
        sidecar.close()


def test_a_second_sidecar_on_the_same_data_dir_is_a_guest_at_once(db: Path) -> None:
    first, second = EmbeddedBackend(db), EmbeddedBackend(db)
    try:
        first.client().set("k", "v")
        t0 = time.monotonic()
        assert second.client().get("k") == "v" and time.monotonic() - t0 < 1.0
        assert first.owner and not second.owner and len(redis_servers(db.parent)) == 1
        second.close()  # a guest leaves the server running
        assert first.client().ping()
    finally:
        second.close()
        first.close()
