"""The shop's SQL functions (db/migrations/0003_shop.sql), called over asyncpg or Supabase.

One contract, two transports: `rpc(function, params)` calls a function in the `public` schema
with named arguments and returns its decoded JSON result (None for SQL null). A refusal by a
function (SQLSTATE P0001) becomes ShopError with its stable code; a database that cannot
answer (down, restarting, out of connections, too slow, a PostgREST 5xx) becomes
ShopUnavailable; anything else (a bug) is raised as it is. Callers retry ShopUnavailable;
the API answers it with 503.

Both transports turn the JSON parameters into SQL values the same way, through the function's
declared parameter types (PostgREST's `json_to_record`, and `jsonb_to_record` here), so a
uuid is passed as a string, numeric as a number or string, jsonb as a list or dict.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClientOptions, acreate_client

if TYPE_CHECKING:
    from supabase import AsyncClient

    from workers.settings import Settings

# How long one call may take (either transport) before it counts as failed, and how long
# opening a connection may take: a database that hangs must not hang its callers.
RPC_TIMEOUT_SECONDS = 25.0
CONNECT_TIMEOUT_SECONDS = 5.0


class ShopError(Exception):
    """A refusal by a shop function: `code` is the stable code, `detail` a sentence."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


class ShopUnavailable(Exception):
    """The database could not answer this call; it may or may not have run (every shop
    function is idempotent for its order, so a retry is safe)."""


# Failures that mean "the database is not answering now", whoever sees them.
DB_OUTAGES: tuple[type[BaseException], ...] = (ShopUnavailable, OSError, TimeoutError)
_ASYNCPG_OUTAGES = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.InterfaceError,  # the connection closed under the call
    OSError,
    TimeoutError,
)


class ShopDb(Protocol):
    async def rpc(self, function: str, params: dict[str, Any]) -> Any: ...

    async def close(self) -> None: ...


def _json_default(value: Any) -> Any:
    # Order ids arrive as UUIDs and rates as Decimals; both travel as JSON strings, which
    # the function's parameter types read back exactly.
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _to_json(params: dict[str, Any]) -> str:
    return json.dumps(params, default=_json_default)


class PostgresShopDb:
    """The functions over an asyncpg pool (DATABASE_URL)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # function name -> [(parameter name, SQL type), ...], read from pg_proc once.
        self._signatures: dict[str, list[tuple[str, str]]] = {}

    @classmethod
    async def connect(cls, dsn: str, *, max_size: int = 10) -> PostgresShopDb:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                timeout=CONNECT_TIMEOUT_SECONDS,
                command_timeout=RPC_TIMEOUT_SECONDS,
            )
        except _ASYNCPG_OUTAGES as err:
            raise ShopUnavailable(f"connecting: {err}") from err
        return cls(pool)

    async def _signature(self, function: str) -> list[tuple[str, str]]:
        if function not in self._signatures:
            row = await self._pool.fetchrow(
                """
                SELECT p.proargnames AS names,
                       array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t) AS types
                FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = 'public' AND p.proname = $1
                """,
                function,
            )
            if row is None:
                raise LookupError(f"no function public.{function}")
            self._signatures[function] = list(zip(row["names"] or [], row["types"], strict=True))
        return self._signatures[function]

    async def rpc(self, function: str, params: dict[str, Any]) -> Any:
        signature = await self._signature(function)
        known = dict(signature)
        unknown = set(params) - set(known)
        if unknown:
            raise LookupError(f"public.{function} has no parameter {', '.join(sorted(unknown))}")
        # Only the parameters given, so the function's defaults apply to the others.
        names = [name for name, _ in signature if name in params]
        arguments = ", ".join(f"{_ident(n)} => r.{_ident(n)}" for n in names)
        sql = f"SELECT to_jsonb(public.{_ident(function)}({arguments}))::text"
        args: tuple[Any, ...] = ()
        if names:
            columns = ", ".join(f"{_ident(n)} {known[n]}" for n in names)
            sql += f" FROM jsonb_to_record($1::jsonb) AS r({columns})"
            args = (_to_json(params),)
        try:
            text = await self._pool.fetchval(sql, *args)
        except asyncpg.RaiseError as err:
            raise ShopError(err.message, err.detail or "") from None
        except _ASYNCPG_OUTAGES as err:
            raise ShopUnavailable(f"{function}: {type(err).__name__}: {err}") from err
        return None if text is None else json.loads(text)

    async def close(self) -> None:
        await self._pool.close()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SupabaseShopDb:
    """The functions over Supabase's REST API (SUPABASE_URL, supabase-py `rpc`)."""

    def __init__(self, client: AsyncClient, http: httpx.AsyncClient) -> None:
        self._client = client
        self._http = http

    @classmethod
    async def connect(
        cls, url: str, key: str, *, timeout: float = RPC_TIMEOUT_SECONDS
    ) -> SupabaseShopDb:
        # Our own HTTP client, so close() releases every connection the SDK's parts opened.
        http = httpx.AsyncClient(timeout=timeout)
        options = AsyncClientOptions(
            auto_refresh_token=False,
            persist_session=False,
            httpx_client=http,
            # A POST that may have run is never repeated behind the caller's back.
            postgrest_client_retry=False,
        )
        try:
            client = await acreate_client(url, key, options=options)
        except BaseException:
            await http.aclose()
            raise
        return cls(client, http)

    async def rpc(self, function: str, params: dict[str, Any]) -> Any:
        body = json.loads(_to_json(params))
        try:
            response = await self._client.rpc(function, body).execute()
        except APIError as err:
            if err.code == "P0001":
                raise ShopError(err.message or "", _text(err.details)) from None
            if _is_outage(err):
                raise ShopUnavailable(f"{function}: {err.code}: {err.message}") from err
            raise
        except httpx.TransportError as err:
            raise ShopUnavailable(f"{function}: {type(err).__name__}: {err}") from err
        return response.data

    async def close(self) -> None:
        await self._http.aclose()


# PostgREST's codes for a database it cannot reach or use (PGRST000-003: connection, pool,
# schema cache), and the SQLSTATE classes of a database that is going away or overloaded.
_POSTGREST_OUTAGE_CODES = ("PGRST000", "PGRST001", "PGRST002", "PGRST003")
_SQLSTATE_OUTAGE_CLASSES = ("08", "53", "57")


def _is_outage(err: APIError) -> bool:
    code = err.code or ""
    return code in _POSTGREST_OUTAGE_CODES or code[:2] in _SQLSTATE_OUTAGE_CLASSES


def _text(details: Any) -> str:
    if details is None:
        return ""
    return details if isinstance(details, str) else json.dumps(details)


@asynccontextmanager
async def open_shop_db(settings: Settings) -> AsyncIterator[ShopDb]:
    """Supabase when SUPABASE_URL and its key are set, else asyncpg on DATABASE_URL."""
    db: ShopDb
    if settings.supabase_enabled:
        assert settings.supabase_url and settings.supabase_service_role_key
        db = await SupabaseShopDb.connect(settings.supabase_url, settings.supabase_service_role_key)
    elif settings.database_url:
        db = await PostgresShopDb.connect(settings.database_url)
    else:
        raise RuntimeError("the shop needs DATABASE_URL, or SUPABASE_URL with its key")
    try:
        yield db
    finally:
        await db.close()
