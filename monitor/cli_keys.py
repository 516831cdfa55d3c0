"""`featurewatch keys create | list | revoke`: API keys with roles, stored hashed in the audit Redis.

`create` prints the key's details to stderr and the key itself alone on the last line of stdout (shown
once: only its hash is stored), so `KEY=$(featurewatch keys create …)` captures exactly the key. `list`
never shows keys, only ids, names, roles and tenants. Settings (`--config`, `--data-dir`, `--redis-url`,
FEATUREWATCH_* variables) name the same Redis as `featurewatch serve`; with the embedded one, a running
sidecar's server is used (monitor.redis_conn). Exit 2 for bad input, naming the field; 1 when Redis cannot
be reached or the key id is unknown.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from monitor.keystore import KeyInputError, KeyStore, validate

err = Console(stderr=True, soft_wrap=True)
keys_app = typer.Typer(help="Create, list and revoke API keys (roles: client, reviewer, admin).")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file (or FEATUREWATCH_CONFIG).")
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data dir with the embedded Redis (audit.rdb).")
]
RedisUrlOpt = Annotated[str | None, typer.Option("--redis-url", help="External Redis (default: embedded).")]


@keys_app.command("create")
def create(
    role: Annotated[str, typer.Option("--role", help="client | reviewer | admin")],
    tenant: Annotated[
        list[str], typer.Option("--tenant", help="Tenant (repeatable); '*' = all tenants (admin only).")
    ],
    name: Annotated[str | None, typer.Option("--name", help="Shown as the reviewer in labels.")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    redis_url: RedisUrlOpt = None,
) -> None:
    """Create a key; the key alone is the last line of stdout (shown once)."""
    try:
        validate(role, tenant, name)  # before touching Redis: bad input never starts a server
    except KeyInputError as e:
        _fail(2, str(e))
    with _store(config, data_dir, redis_url) as store:
        key, info = store.create(role, tenant, name)
    err.print(
        f"created {info.role} key {info.key_id} ({escape(info.name)}) for tenant(s) "
        f"{', '.join(info.tenants)}. It is shown once, below; only its hash is stored. "
        "Send it as `Authorization: Bearer KEY`."
    )
    typer.echo(key)


@keys_app.command("list")
def list_keys(config: ConfigOpt = None, data_dir: DataDirOpt = None, redis_url: RedisUrlOpt = None) -> None:
    """Every key's id, role, tenants, creation time and name (never the key)."""
    with _store(config, data_dir, redis_url) as store:
        infos = store.list()
    if not infos:
        err.print("no API keys (inference is open; audit routes refuse everyone)")
        return
    typer.echo(f"{'key_id':<12}  {'role':<8}  {'created (UTC)':<19}  {'tenants':<24}  name")
    for i in infos:
        when = dt.datetime.fromtimestamp(i.created, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{i.key_id:<12}  {i.role:<8}  {when:<19}  {','.join(i.tenants):<24}  {i.name}")


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (first column of `keys list`).")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    redis_url: RedisUrlOpt = None,
) -> None:
    """Revoke a key and end its console sessions (a running sidecar stops accepting it within 1 s)."""
    with _store(config, data_dir, redis_url) as store:
        found = store.revoke(key_id)
    if not found:
        _fail(1, f"key_id: no key {key_id!r} (see `featurewatch keys list`)")
    err.print(f"revoked key {escape(key_id)}")


# ---- helpers ------------------------------------------------------------------------------------------
@contextmanager
def _store(config: Path | None, data_dir: Path | None, redis_url: str | None) -> Iterator[KeyStore]:
    """The KeyStore on the settings' Redis for the block; exit 2 for bad settings, 1 when Redis fails."""
    import redis

    from monitor.redis_conn import open_redis
    from monitor.settings import SettingsError, load_settings

    try:
        settings = load_settings(config, data_dir=data_dir, redis_url=redis_url)
    except SettingsError as e:
        _fail(2, str(e))
    try:
        with open_redis(settings) as client:
            yield KeyStore(client)
    except redis.RedisError as e:
        _fail(1, f"Redis unavailable: {e}")


def _fail(code: int, message: str) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)
