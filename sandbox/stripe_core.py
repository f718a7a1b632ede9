"""The simulated Stripe account: Checkout Sessions, payments, refunds and the events they emit.

Objects are kept in Stripe's API shape so they can be returned and embedded in events as
they are. Everything a session needs beyond its API shape (line items, settlement time of a
delayed payment) sits next to it in the same stored record. Methods are synchronous and save
before returning, so no request ever observes, or persists, a half-applied change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from sandbox.config import SandboxConfig
from sandbox.store import JsonStore
from sandbox.stripe_events import StripeEvents
from sandbox.stripe_ids import new_id

logger = logging.getLogger(__name__)

MIN_SESSION_SECONDS = 30 * 60
MAX_SESSION_SECONDS = 24 * 3600
REFUND_REASONS = {"duplicate", "fraudulent", "requested_by_customer"}
# Expiry times are whole seconds and delayed payments take seconds, so a short poll is exact
# enough and simpler than tracking the next deadline.
TIMER_TICK = 0.1

SESSION_PARAMS = {
    "mode", "line_items", "success_url", "cancel_url", "client_reference_id",
    "customer_email", "metadata", "expires_at", "payment_intent_data",
}  # fmt: skip
LINE_ITEM_PARAMS = {"price_data", "quantity"}
PRICE_DATA_PARAMS = {"currency", "unit_amount", "product_data"}
PRODUCT_DATA_PARAMS = {"name", "description", "metadata"}
PAYMENT_INTENT_DATA_PARAMS = {"metadata", "description"}
REFUND_PARAMS = {"payment_intent", "amount", "metadata", "reason"}
# set_fault: what can be made to fail, and how.
FAULT_MODES = {"refund": {"error", "lost_answer"}, "session": {"error", "forbidden"}}


class StripeError(Exception):
    """An error response in Stripe's shape; the API layer renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        error = {"type": type, "message": message, "param": param, "code": code}
        self.body = {"error": {key: value for key, value in error.items() if value is not None}}


def _server_error() -> StripeError:
    return StripeError(
        500,
        "An unknown error occurred (sandbox fault injection).",
        type="api_error",
    )


def _missing(kind: str, object_id: str, param: str = "id") -> StripeError:
    return StripeError(404, f"No such {kind}: '{object_id}'", param=param, code="resource_missing")


class StripeSandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self.store = JsonStore(config.data_dir / "stripe.json")
        self.events = StripeEvents(
            self.store,
            url=config.webhook_url,
            secret=config.webhook_secret,
            first_retry=config.webhook_retry_seconds,
        )
        # Session records: {"session": <checkout.session>, "line_items": [...],
        # "payment_intent_metadata": {...}, "settle_at": unix time of a pending bank transfer}
        self._sessions = self.store.collection("checkout_sessions")
        self._payment_intents = self.store.collection("payment_intents")
        self._charges = self.store.collection("charges")
        self._refunds = self.store.collection("refunds")
        # Test control (set_fault): "<kind>:<id>" -> {"mode": ..., "times": n}
        self._faults = self.store.collection("faults")

    # -- Checkout Sessions -------------------------------------------------------------------

    def create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        _reject_unknown(params, SESSION_PARAMS)
        if params.get("mode") != "payment":
            if "mode" not in params:
                raise _required("mode")
            raise StripeError(400, "The sandbox supports only mode=payment.", param="mode")
        line_items = _line_items(params)
        currency = line_items[0]["currency"]
        if any(item["currency"] != currency for item in line_items):
            raise StripeError(400, "All line items must use the same currency.", param="line_items")
        success_url = _str(params, "success_url")
        payment_intent_data = _hash(params, "payment_intent_data")
        _reject_unknown(payment_intent_data, PAYMENT_INTENT_DATA_PARAMS, "payment_intent_data")

        now = int(time.time())
        expires_at = _int(params, "expires_at")
        if expires_at is None:
            expires_at = now + MAX_SESSION_SECONDS
        elif expires_at < now + MIN_SESSION_SECONDS:
            raise StripeError(
                400,
                "The `expires_at` timestamp must be at least 30 minutes from "
                "Checkout Session creation.",
                param="expires_at",
            )
        elif expires_at > now + MAX_SESSION_SECONDS:
            raise StripeError(
                400,
                "The `expires_at` timestamp must be less than 24 hours from "
                "Checkout Session creation.",
                param="expires_at",
            )

        session_id = new_id("cs_test", 58)
        total = sum(item["amount"] for item in line_items)
        session = {
            "id": session_id,
            "object": "checkout.session",
            "amount_subtotal": total,
            "amount_total": total,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
            "created": now,
            "currency": currency,
            "customer_details": None,
            "customer_email": params.get("customer_email"),
            "expires_at": expires_at,
            "livemode": False,
            "metadata": _metadata(params),
            "mode": "payment",
            "payment_intent": None,
            "payment_status": "unpaid",
            "status": "open",
            "success_url": success_url,
            "url": f"{self._config.public_url}/stripe/pay/{session_id}",
        }
        self._sessions[session_id] = {
            "session": session,
            "line_items": line_items,
            "payment_intent_metadata": _metadata(payment_intent_data),
            "settle_at": None,
        }
        self.store.save()
        return session

    def get_session(self, session_id: str) -> dict[str, Any]:
        return self._session_record(session_id)["session"]

    def retrieve_session(self, session_id: str) -> dict[str, Any]:
        """GET /v1/checkout/sessions/{id}, where test faults apply."""
        fault = self._take_fault("session", session_id)
        if fault == "error":
            raise _server_error()
        if fault == "forbidden":
            raise StripeError(
                403,
                "The provided key does not have the required permissions for this endpoint "
                "(sandbox fault injection).",
            )
        return self.get_session(session_id)

    def line_items(self, session_id: str) -> list[dict[str, Any]]:
        return self._session_record(session_id)["line_items"]

    def expire_session(self, session_id: str, params: dict[str, Any]) -> dict[str, Any]:
        _reject_unknown(params, set())
        session = self.get_session(session_id)
        if session["status"] != "open":
            raise StripeError(
                400, 'Only Checkout Sessions with a status in ["open"] can be expired.'
            )
        session.update(status="expired", url=None)
        self.events.emit("checkout.session.expired", session)
        self.store.save()
        return session

    def pay(self, session_id: str, *, delayed: bool, racing_expiry: bool = False) -> dict[str, Any]:
        """The customer pays on the hosted page: by card at once, or by a delayed transfer.

        `racing_expiry` is fault injection: a card payment already in flight when the session
        expired still goes through, so the merchant sees a payment for an expired order.
        """
        record = self._session_record(session_id)
        session = record["session"]
        if session["status"] != "open" and not (racing_expiry and session["status"] == "expired"):
            raise StripeError(400, f"This Checkout Session is {session['status']}.")
        intent = {
            "id": new_id("pi"),
            "object": "payment_intent",
            "amount": session["amount_total"],
            "amount_received": 0,
            "created": int(time.time()),
            "currency": session["currency"],
            "latest_charge": None,
            "livemode": False,
            "metadata": dict(record["payment_intent_metadata"]),
            "status": "processing",
        }
        self._payment_intents[intent["id"]] = intent
        session.update(
            status="complete",
            payment_intent=intent["id"],
            customer_details={"email": session["customer_email"]},
            url=None,
        )
        if delayed:
            record["settle_at"] = time.time() + self._config.async_payment_seconds
        else:
            self._capture(session, intent)
        self.events.emit("checkout.session.completed", session)
        self.store.save()
        return session

    def _settle(self, record: dict[str, Any]) -> None:
        """A delayed payment arrives, or fails or never settles when the email asks for it."""
        record["settle_at"] = None
        session = record["session"]
        intent = self._payment_intents[session["payment_intent"]]
        email = session["customer_email"] or ""
        if "+hold" in email:
            return  # stays processing for ever: no event, nothing to learn
        if "+fail" in email:
            intent["status"] = "requires_payment_method"
            self.events.emit("checkout.session.async_payment_failed", session)
        else:
            self._capture(session, intent)
            self.events.emit("checkout.session.async_payment_succeeded", session)
        self.store.save()

    def _capture(self, session: dict[str, Any], intent: dict[str, Any]) -> None:
        charge = {
            "id": new_id("ch"),
            "object": "charge",
            "amount": intent["amount"],
            "amount_captured": intent["amount"],
            "amount_refunded": 0,
            "created": int(time.time()),
            "currency": intent["currency"],
            "livemode": False,
            "metadata": dict(intent["metadata"]),
            "paid": True,
            "payment_intent": intent["id"],
            "refunded": False,
            "status": "succeeded",
        }
        self._charges[charge["id"]] = charge
        intent.update(
            status="succeeded", amount_received=intent["amount"], latest_charge=charge["id"]
        )
        session["payment_status"] = "paid"

    def _session_record(self, session_id: str) -> dict[str, Any]:
        record = self._sessions.get(session_id)
        if record is None:
            raise _missing("checkout.session", session_id)
        return record

    # -- Payment intents and refunds ---------------------------------------------------------

    def get_payment_intent(self, intent_id: str) -> dict[str, Any]:
        intent = self._payment_intents.get(intent_id)
        if intent is None:
            raise _missing("payment_intent", intent_id)
        return intent

    def create_refund(self, params: dict[str, Any]) -> dict[str, Any]:
        _reject_unknown(params, REFUND_PARAMS)
        intent_id = params.get("payment_intent")
        if not intent_id:
            raise _required("payment_intent")
        intent = self._payment_intents.get(intent_id)
        if intent is None:
            raise _missing("payment_intent", intent_id, param="payment_intent")
        if intent["latest_charge"] is None:
            raise StripeError(
                400,
                f"This PaymentIntent ({intent_id}) does not have a successful charge to refund.",
                param="payment_intent",
            )
        charge = self._charges[intent["latest_charge"]]
        remaining = charge["amount"] - charge["amount_refunded"]
        if remaining == 0:
            raise StripeError(
                400,
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
            )
        amount = _int(params, "amount", minimum=1)
        if amount is None:
            amount = remaining
        elif amount > remaining:
            raise StripeError(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge "
                f"({remaining})",
                param="amount",
                code="amount_too_large",
            )
        reason = params.get("reason")
        if reason is not None and reason not in REFUND_REASONS:
            raise StripeError(400, f"Invalid reason: {reason}", param="reason")
        fault = self._take_fault("refund", _metadata(params).get("order_id"))
        if fault == "error":
            raise _server_error()

        refund = {
            "id": new_id("re"),
            "object": "refund",
            "amount": amount,
            "charge": charge["id"],
            "created": int(time.time()),
            "currency": charge["currency"],
            "metadata": _metadata(params),
            "payment_intent": intent_id,
            "reason": reason,
            "status": "succeeded",
        }
        self._refunds[refund["id"]] = refund
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        self.events.emit("charge.refunded", charge)
        self.store.save()
        if fault == "lost_answer":
            # The refund exists, but the answer that says so never reaches the client.
            raise _server_error()
        return refund

    def set_fault(self, body: Any) -> dict[str, Any]:
        """Test control: make calls about one object fail, `times` times.

        `{"kind": "refund", "id": <metadata[order_id]>, "mode": "error" | "lost_answer"}`:
        refund creation answers 500 without refunding, or refunds and then answers 500.
        `{"kind": "session", "id": <session id>, "mode": "error" | "forbidden"}`: reading the
        Checkout Session answers 500, or 403 as for a key lacking the permission.
        Mode `off` clears the fault.
        """
        if not isinstance(body, dict):
            raise StripeError(400, "body must be a JSON object")
        kind, object_id, mode = body.get("kind"), body.get("id"), body.get("mode")
        modes = FAULT_MODES.get(kind) if isinstance(kind, str) else None
        if modes is None:
            raise StripeError(400, f"kind must be one of {sorted(FAULT_MODES)}", param="kind")
        if not isinstance(object_id, str) or not object_id:
            raise StripeError(400, "id is required", param="id")
        key = f"{kind}:{object_id}"
        if mode == "off":
            self._faults.pop(key, None)
        elif mode in modes:
            times = body.get("times", 1)
            if not isinstance(times, int) or times < 1:
                raise StripeError(400, "times must be a positive integer", param="times")
            self._faults[key] = {"mode": mode, "times": times}
        else:
            raise StripeError(400, f"mode must be one of {sorted(modes)} or off", param="mode")
        self.store.save()
        return {"kind": kind, "id": object_id, **self._faults.get(key, {})}

    def _take_fault(self, kind: str, object_id: str | None) -> str | None:
        key = f"{kind}:{object_id}"
        fault = self._faults.get(key) if object_id else None
        if fault is None:
            return None
        fault["times"] -= 1
        if fault["times"] <= 0:
            del self._faults[key]
        self.store.save()
        return fault["mode"]

    def list_refunds(self, params: dict[str, Any]) -> dict[str, Any]:
        _reject_unknown(params, {"payment_intent", "limit", "starting_after"})
        limit = min(_int(params, "limit", minimum=1) or 10, 100)
        intent_id = params.get("payment_intent")
        refunds = [r for r in self._refunds.values() if intent_id in (None, r["payment_intent"])]
        # Newest first, as Stripe lists them; ids break ties within one second.
        refunds.sort(key=lambda r: (r["created"], r["id"]), reverse=True)
        after = params.get("starting_after")
        if after is not None:
            ids = [r["id"] for r in refunds]
            if after not in ids:
                raise _missing("refund", after, param="starting_after")
            refunds = refunds[ids.index(after) + 1 :]
        return {
            "object": "list",
            "data": refunds[:limit],
            "has_more": len(refunds) > limit,
            "url": "/v1/refunds",
        }

    def get_refund(self, refund_id: str) -> dict[str, Any]:
        refund = self._refunds.get(refund_id)
        if refund is None:
            raise _missing("refund", refund_id)
        return refund

    def get_event(self, event_id: str) -> dict[str, Any]:
        event = self.events.get(event_id)
        if event is None:
            raise _missing("event", event_id)
        return event

    # -- Background work ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run session expiry, delayed settlement and webhook delivery while the app is up."""
        tasks = [
            asyncio.create_task(self._run_timers(), name="stripe-timers"),
            asyncio.create_task(self.events.deliver_forever(), name="stripe-webhooks"),
        ]
        for task in tasks:
            task.add_done_callback(_log_crash)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_timers(self) -> None:
        while True:
            now = time.time()
            for record in list(self._sessions.values()):
                session = record["session"]
                if session["status"] == "open" and session["expires_at"] <= now:
                    self.expire_session(session["id"], {})
                elif record["settle_at"] is not None and record["settle_at"] <= now:
                    self._settle(record)
            await asyncio.sleep(TIMER_TICK)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("sandbox task %s crashed", task.get_name(), exc_info=task.exception())


# -- Parameter validation, with Stripe's messages ----------------------------------------------


def _name(prefix: str, key: str) -> str:
    """A nested parameter's name as Stripe reports it, e.g. `line_items[0][quantity]`."""
    return f"{prefix}[{key}]" if prefix else key


def _required(param: str) -> StripeError:
    return StripeError(400, f"Missing required param: {param}.", param=param)


def _reject_unknown(params: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
    for key in params:
        if key not in allowed:
            name = _name(prefix, key)
            raise StripeError(
                400,
                f"Received unknown parameter: {name} (or the sandbox does not implement it)",
                param=name,
            )


def _hash(params: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = params.get(key, {})
    if value == "":  # stripe-python sends an empty dict as an empty string
        return {}
    if not isinstance(value, dict):
        raise StripeError(400, "Invalid hash", param=_name(prefix, key))
    return value


def _int(params: dict[str, Any], key: str, prefix: str = "", *, minimum: int = 0) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise StripeError(400, f"Invalid integer: {value}", param=_name(prefix, key)) from None
    if number < minimum:
        raise StripeError(
            400, f"This value must be greater than or equal to {minimum}.", param=_name(prefix, key)
        )
    return number


def _str(params: dict[str, Any], key: str, prefix: str = "") -> str:
    value = params.get(key)
    if not value:
        raise _required(_name(prefix, key))
    if not isinstance(value, str):
        raise StripeError(400, "Invalid string", param=_name(prefix, key))
    return value


def _metadata(params: dict[str, Any]) -> dict[str, str]:
    # Stripe drops keys set to an empty string: that is how a key is unset.
    return {key: value for key, value in _hash(params, "metadata").items() if value != ""}


def _line_items(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Validated line items, flattened to what the sandbox needs."""
    items = params.get("line_items")
    if not items:
        raise _required("line_items")
    if not isinstance(items, list):
        raise StripeError(400, "Invalid array", param="line_items")
    result = []
    for index, item in enumerate(items):
        prefix = f"line_items[{index}]"
        if not isinstance(item, dict):
            raise StripeError(400, "Invalid hash", param=prefix)
        _reject_unknown(item, LINE_ITEM_PARAMS, prefix)
        if "price_data" not in item:
            raise StripeError(
                400,
                "The sandbox supports only line items with price_data (it keeps no Prices).",
                param=_name(prefix, "price_data"),
            )
        price_prefix = _name(prefix, "price_data")
        price_data = _hash(item, "price_data", prefix)
        _reject_unknown(price_data, PRICE_DATA_PARAMS, price_prefix)
        product_prefix = _name(price_prefix, "product_data")
        product_data = _hash(price_data, "product_data", price_prefix)
        _reject_unknown(product_data, PRODUCT_DATA_PARAMS, product_prefix)
        unit_amount = _int(price_data, "unit_amount", price_prefix)
        if unit_amount is None:
            raise _required(_name(price_prefix, "unit_amount"))
        quantity = _int(item, "quantity", prefix, minimum=1)
        if quantity is None:
            raise _required(_name(prefix, "quantity"))
        result.append(
            {
                "name": _str(product_data, "name", product_prefix),
                "currency": _str(price_data, "currency", price_prefix).lower(),
                "unit_amount": unit_amount,
                "quantity": quantity,
                "amount": unit_amount * quantity,
            }
        )
    return result
