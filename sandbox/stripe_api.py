"""Stripe's REST API (v1), as much as orderflow uses, for stripe-python pointed here by base URL.

Requests arrive form-encoded with nested keys (`line_items[0][quantity]=2`); responses and
errors keep Stripe's JSON shapes and status codes, so stripe-python raises the same exception
types (AuthenticationError, InvalidRequestError, IdempotencyError) as against the real API.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sandbox.store import JsonStore
from sandbox.stripe_core import StripeError, StripeSandbox
from sandbox.stripe_ids import new_id

Action = Callable[[dict[str, Any]], dict[str, Any]]

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


def decode_params(body: bytes) -> dict[str, Any]:
    """Stripe's form encoding back into nested dicts, with `[0]`, `[1]`... keys as lists.

    The sandbox knows no parameter types, so a hash whose keys are all digits
    (`metadata[0]=x`) reads as a list too; orderflow sends no such keys.
    """
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body.decode(), keep_blank_values=True):
        match = _KEY.fullmatch(key)
        if match is None:
            raise StripeError(400, f"Invalid parameter name: {key}", param=key)
        *parents, leaf = [match[1], *_SEGMENT.findall(match[2])]
        node = root
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StripeError(400, "Invalid hash", param=key)
        if isinstance(node.get(leaf), dict):
            raise StripeError(400, "Invalid hash", param=key)
        node[leaf] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if node and all(key.isdigit() for key in node):
        return [_lists(node[key]) for key in sorted(node, key=int)]
    return {key: _lists(value) for key, value in node.items()}


class IdempotencyKeys:
    """Stripe's idempotency layer: a key replays its first response for the same request.

    As at Stripe, a server error (5xx) is saved and replayed too, so a client that retries
    with the key that met a 500 meets the same 500 again; validation errors (4xx) are not
    saved, so a corrected request under the same key is evaluated afresh.
    """

    def __init__(self, store: JsonStore) -> None:
        self._store = store
        self._keys = store.collection("idempotency_keys")

    def run(
        self, key: str | None, path: str, params: dict[str, Any], action: Action
    ) -> JSONResponse:
        if key is None:
            return _json(200, action(params))
        fingerprint = {"path": path, "params": params}
        saved = self._keys.get(key)
        if saved is not None:
            if saved["request"] != fingerprint:
                raise StripeError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with. Try using a key other than "
                    f"'{key}' if you meant to execute a different request.",
                    type="idempotency_error",
                )
            headers = {"Idempotent-Replayed": "true"}
            return _json(saved.get("status", 200), saved["body"], headers)
        try:
            body, status = action(params), 200
        except StripeError as exc:
            if exc.status < 500:
                raise
            body, status = exc.body, exc.status
        self._keys[key] = {"request": fingerprint, "body": body, "status": status}
        self._store.save()
        return _json(status, body)


def create_router(stripe: StripeSandbox, api_key: str) -> APIRouter:
    router = APIRouter(prefix="/stripe", tags=["stripe"])
    idempotency = IdempotencyKeys(stripe.store)

    async def get(request: Request, fetch: Callable[[], dict[str, Any]]) -> JSONResponse:
        try:
            _authenticate(request, api_key)
            return _json(200, fetch())
        except StripeError as exc:
            return _json(exc.status, exc.body)

    async def post(request: Request, action: Action) -> JSONResponse:
        try:
            _authenticate(request, api_key)
            params = decode_params(await request.body())
            key = request.headers.get("idempotency-key")
            return idempotency.run(key, request.url.path, params, action)
        except StripeError as exc:
            return _json(exc.status, exc.body)

    @router.post("/v1/checkout/sessions")
    async def create_checkout_session(request: Request) -> JSONResponse:
        return await post(request, stripe.create_session)

    @router.get("/v1/checkout/sessions/{session_id}")
    async def retrieve_checkout_session(request: Request, session_id: str) -> JSONResponse:
        return await get(request, lambda: stripe.retrieve_session(session_id))

    @router.post("/v1/checkout/sessions/{session_id}/expire")
    async def expire_checkout_session(request: Request, session_id: str) -> JSONResponse:
        return await post(request, lambda params: stripe.expire_session(session_id, params))

    @router.get("/v1/payment_intents/{intent_id}")
    async def retrieve_payment_intent(request: Request, intent_id: str) -> JSONResponse:
        return await get(request, lambda: stripe.get_payment_intent(intent_id))

    @router.post("/v1/refunds")
    async def create_refund(request: Request) -> JSONResponse:
        return await post(request, stripe.create_refund)

    @router.get("/v1/refunds")
    async def list_refunds(request: Request) -> JSONResponse:
        return await get(request, lambda: stripe.list_refunds(dict(request.query_params)))

    @router.get("/v1/refunds/{refund_id}")
    async def retrieve_refund(request: Request, refund_id: str) -> JSONResponse:
        return await get(request, lambda: stripe.get_refund(refund_id))

    @router.get("/v1/events/{event_id}")
    async def retrieve_event(request: Request, event_id: str) -> JSONResponse:
        return await get(request, lambda: stripe.get_event(event_id))

    @router.post("/_sandbox/sessions/{session_id}/late-pay")
    async def pay_racing_expiry(session_id: str) -> JSONResponse:
        """Fault injection: a card payment that was in flight when the session expired."""
        try:
            return _json(200, stripe.pay(session_id, delayed=False, racing_expiry=True))
        except StripeError as exc:
            return _json(exc.status, exc.body)

    @router.post("/_sandbox/faults")
    async def set_fault(request: Request) -> JSONResponse:
        """Fault injection for tests (see StripeSandbox.set_fault); not part of Stripe's API."""
        try:
            return _json(200, stripe.set_fault(await request.json()))
        except StripeError as exc:
            return _json(exc.status, exc.body)
        except ValueError:
            return _json(400, StripeError(400, "body must be JSON").body)

    @router.get("/_sandbox/deliveries")
    async def list_deliveries() -> list[dict[str, Any]]:
        """Webhook delivery state, for tests and debugging; not part of Stripe's API."""
        return stripe.events.deliveries()

    # Last, so it only catches what no route above matched: Stripe's answer to a wrong URL
    # beats FastAPI's bare 404 when a client calls something the sandbox lacks.
    @router.api_route("/v1/{path:path}", methods=["GET", "POST", "DELETE"])
    async def unrecognized(request: Request, path: str) -> JSONResponse:
        message = f"Unrecognized request URL ({request.method}: /v1/{path})."
        return _json(404, StripeError(404, message).body)

    return router


def _authenticate(request: Request, api_key: str) -> None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    key = credentials
    # Stripe also takes the key as a Basic-auth user name, the form `curl -u sk_test_...:` sends.
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError):
            key = base64.b64decode(credentials).decode().partition(":")[0]
    elif scheme.lower() != "bearer":
        key = ""
    if not key:
        raise StripeError(
            401,
            "You did not provide an API key. You need to provide your API key in the "
            "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
            "YOUR_SECRET_KEY').",
        )
    if not secrets.compare_digest(key.encode(), api_key.encode()):
        raise StripeError(401, f"Invalid API Key provided: {key[:8]}{'*' * 8}{key[-4:]}")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    # stripe-python quotes Request-Id in its error messages, as it does for the real API.
    headers = {"Request-Id": new_id("req", 14), **(headers or {})}
    return JSONResponse(body, status_code=status, headers=headers)
