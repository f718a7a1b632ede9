"""Supabase's REST API for functions: `POST /supabase/rest/v1/rpc/{function}`, as PostgREST.

Enough of PostgREST for supabase-py's `rpc()` to behave as against a Supabase project: the
gateway's `apikey` check, the function chosen by the names of the JSON body's keys among the
functions of the `public` schema, arguments converted by the function's parameter types
(`json_to_record`, as PostgREST does), the scalar result returned as JSON, and errors as
PostgREST shapes them: `{"code", "message", "details", "hint"}` with the HTTP status PostgREST
maps each SQLSTATE to (src/PostgREST/Error.hs, `mapSQLtoHTTP`).

SUPABASE_URL is then SANDBOX_URL + "/supabase". Without a database the sandbox still starts,
and every call answers 503 as PostgREST does when it cannot reach its database.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg
from fastapi import APIRouter, Request, Response

SCHEMA = "public"


@dataclass(frozen=True)
class Routine:
    name: str
    params: tuple[tuple[str, str], ...]  # (name, SQL type), in declaration order
    required: frozenset[str]  # the parameters without a default
    returns_set: bool


class PostgrestError(Exception):
    """An answer PostgREST gives instead of a result."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        details: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.hint = details, hint

    def response(self) -> Response:
        body = {"code": self.code, "message": self.message, "details": self.details}
        body["hint"] = self.hint
        headers = {"Proxy-Status": f"PostgREST; error={self.code}"} if self.code else {}
        return Response(
            json.dumps(body),
            status_code=self.status,
            media_type="application/json; charset=utf-8",
            headers=headers,
        )


# PostgREST's mapping of SQLSTATEs to HTTP statuses: exact codes first, then classes; any
# other code is the client's (400).
_STATUS_BY_CODE = {
    "23503": 409,  # foreign_key_violation
    "23505": 409,  # unique_violation
    "25006": 405,  # read_only_sql_transaction
    "53400": 500,  # configuration_limit_exceeded
    "57P01": 503,  # admin_shutdown
    "P0001": 400,  # a RAISE's default code
    "42P01": 404,  # undefined_table
    "42P17": 500,  # infinite_recursion
    "42501": 403,  # insufficient_privilege (an authenticated request)
}
_STATUS_BY_CLASS = dict.fromkeys(["09", "25", "2D", "38", "39", "3B", "40", "54", "55"], 500)
_STATUS_BY_CLASS |= dict.fromkeys(["57", "58", "F0", "HV", "P0", "XX"], 500)
_STATUS_BY_CLASS |= {"08": 503, "53": 503, "0L": 403, "0P": 403, "28": 403}


def http_status(sqlstate: str, message: str = "") -> int:
    """The HTTP status PostgREST answers a database error with."""
    if sqlstate == "21000":  # cardinality_violation: pg-safeupdate's refusal is the client's
        return 400 if message.endswith("requires a WHERE clause") else 500
    if sqlstate == "22023":  # invalid_parameter_value: a JWT naming a missing role is a 401
        return 401 if message.startswith("role") and message.endswith("does not exist") else 400
    if sqlstate == "42883":  # undefined_function
        return 406 if message.startswith("function xmlagg(") else 404
    if sqlstate in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[sqlstate]
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])  # RAISE SQLSTATE 'PT402': the status the function chose
    return _STATUS_BY_CLASS.get(sqlstate[:2], 400)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgrestSandbox:
    """The functions of one database's `public` schema, with PostgREST's schema cache."""

    def __init__(self, database_url: str | None, *, pool_size: int = 10) -> None:
        self._dsn = database_url
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._routines: dict[str, list[Routine]] = {}

    async def _acquire_pool(self) -> asyncpg.Pool:
        if self._dsn is None:
            raise PostgrestError(
                503,
                "PGRST000",
                "Database connection error. Retrying the connection.",
                "The sandbox has no database: DATABASE_URL is unset.",
            )
        async with self._pool_lock:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=1, max_size=self._pool_size
                    )
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
                    raise PostgrestError(
                        503,
                        "PGRST000",
                        "Database connection error. Retrying the connection.",
                        str(err),
                    ) from err
            return self._pool

    async def _load_schema(self, pool: asyncpg.Pool) -> None:
        # Functions with only IN parameters: the shop's functions are all of that kind.
        rows = await pool.fetch(
            """
            SELECT p.proname AS name, coalesce(p.proargnames, '{}') AS names,
                   array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t) AS types,
                   p.pronargdefaults AS defaults, p.proretset AS returns_set
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = $1 AND p.prokind = 'f' AND p.proargmodes IS NULL
              AND p.pronargs = coalesce(array_length(p.proargnames, 1), 0)
            """,
            SCHEMA,
        )
        routines: dict[str, list[Routine]] = {}
        for row in rows:
            params = tuple(zip(row["names"], row["types"], strict=True))
            required = frozenset(name for name, _ in params[: len(params) - row["defaults"]])
            routines.setdefault(row["name"], []).append(
                Routine(row["name"], params, required, row["returns_set"])
            )
        self._routines = routines

    def _match(self, function: str, keys: set[str]) -> list[Routine]:
        return [
            r
            for r in self._routines.get(function, [])
            if r.required <= keys <= {name for name, _ in r.params}
        ]

    async def call(self, function: str, body: dict[str, Any]) -> str:
        """The function's result as JSON text, or PostgrestError."""
        pool = await self._acquire_pool()
        keys = set(body)
        try:
            candidates = self._match(function, keys)
            if not candidates:
                # As PostgREST after a schema reload: a function created since is found.
                await self._load_schema(pool)
                candidates = self._match(function, keys)
            if not candidates:
                raise _no_function(function, sorted(keys))
            if len(candidates) > 1:
                raise PostgrestError(
                    300,
                    "PGRST203",
                    "Could not choose the best candidate function between: "
                    + ", ".join(f"{SCHEMA}.{function}({_signature(r)})" for r in candidates),
                    None,
                    "Try renaming the parameters or the function itself in the database so "
                    "function overloading can be resolved",
                )
            return await pool.fetchval(*_call_sql(candidates[0], body)) or "null"
        except asyncpg.PostgresError as err:
            sqlstate = getattr(err, "sqlstate", None) or "XX000"
            message = getattr(err, "message", None) or str(err)
            raise PostgrestError(
                http_status(sqlstate, message),
                sqlstate,
                message,
                getattr(err, "detail", None),
                getattr(err, "hint", None),
            ) from err
        except (OSError, asyncpg.InterfaceError) as err:
            raise PostgrestError(
                503, "PGRST001", "Database client error. Retrying the connection.", str(err)
            ) from err

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def _signature(routine: Routine) -> str:
    return ", ".join(f"{name} => {type_}" for name, type_ in routine.params)


def _no_function(function: str, keys: list[str]) -> PostgrestError:
    qualified = f"{SCHEMA}.{function}"
    if keys:
        listed = ", ".join(keys)
        message = f"Could not find the function {qualified}({listed}) in the schema cache"
        with_params = f" with parameter{'s' if len(keys) > 1 else ''} {listed}"
    else:
        message = f"Could not find the function {qualified} without parameters in the schema cache"
        with_params = " without parameters"
    details = (
        f"Searched for the function {qualified}{with_params} or with a single unnamed "
        "json/jsonb parameter, but no matches were found in the schema cache."
    )
    return PostgrestError(404, "PGRST202", message, details, None)


def _call_sql(routine: Routine, body: dict[str, Any]) -> tuple[Any, ...]:
    """One statement, the body converted by the parameters' types as PostgREST does."""
    names = [name for name, _ in routine.params if name in body]
    types = dict(routine.params)
    arguments = ", ".join(f"{_ident(n)} => r.{_ident(n)}" for n in names)
    call = f"{_ident(SCHEMA)}.{_ident(routine.name)}({arguments})"
    source = ""
    args: tuple[Any, ...] = ()
    if names:
        columns = ", ".join(f"{_ident(n)} {types[n]}" for n in names)
        source = f" FROM jsonb_to_record($1::jsonb) AS r({columns})"
        args = (json.dumps(body),)
    if routine.returns_set:
        sql = f"SELECT coalesce(jsonb_agg(x), '[]')::text FROM (SELECT {call} AS x{source}) s"
    else:
        sql = f"SELECT to_jsonb({call})::text{source}"
    return (sql, *args)


def create_router(rest: PostgrestSandbox, key: str) -> APIRouter:
    router = APIRouter(prefix="/supabase/rest/v1", tags=["supabase"])

    def refusal(request: Request) -> PostgrestError | None:
        # Supabase's gateway checks the apikey before PostgREST sees the request; PostgREST
        # then checks the bearer token. Here both must be the configured key.
        apikey = request.headers.get("apikey") or request.query_params.get("apikey")
        if not apikey:
            return PostgrestError(
                401,
                None,
                "No API key found in request",
                hint="No `apikey` request header or url param was found.",
            )
        if not secrets.compare_digest(apikey.encode(), key.encode()):
            return PostgrestError(
                401,
                None,
                "Invalid API key",
                hint="Double check your Supabase `anon` or `service_role` API key.",
            )
        authorization = request.headers.get("authorization")
        if authorization is not None and not secrets.compare_digest(
            authorization.encode(), f"Bearer {key}".encode()
        ):
            return PostgrestError(401, "PGRST301", "No suitable key or wrong key type")
        profile = request.headers.get("content-profile")
        if profile is not None and profile != SCHEMA:
            return PostgrestError(
                406,
                "PGRST106",
                f"Invalid schema: {profile}",
                hint=f"Only the following schemas are exposed: {SCHEMA}",
            )
        return None

    @router.post("/rpc/{function}")
    async def rpc(function: str, request: Request) -> Response:
        refused = refusal(request)
        if refused is not None:
            return refused.response()
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return PostgrestError(400, "PGRST102", "Empty or invalid json").response()
        try:
            result = await rest.call(function, body)
        except PostgrestError as err:
            return err.response()
        return Response(result, media_type="application/json; charset=utf-8")

    return router
