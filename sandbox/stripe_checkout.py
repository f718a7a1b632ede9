"""Stripe's hosted checkout page, reduced to the three choices the order flows care about.

Pay completes the session by card; "bank transfer" completes it unpaid and settles later
(the async_payment_* events); Cancel returns to cancel_url with the session still open.
The action endpoints read no form fields, so tests can press the buttons with a bare POST.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from sandbox.stripe_core import StripeError, StripeSandbox

# Currencies whose minor unit is not a hundredth (Stripe's lists, abridged to the common ones).
ZERO_DECIMAL = {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx",
                "vnd", "vuv", "xaf", "xof", "xpf"}  # fmt: skip
THREE_DECIMAL = {"bhd", "jod", "kwd", "omr", "tnd"}

MESSAGES = {
    "complete": "This checkout session is complete. You can close this page.",
    "expired": "This checkout session has expired. Start a new order to pay.",
}


def format_money(amount: int, currency: str) -> str:
    """Minor units as a readable amount, e.g. 1050 usd -> "10.50 USD"."""
    digits = 0 if currency in ZERO_DECIMAL else 3 if currency in THREE_DECIMAL else 2
    if digits == 0:
        return f"{amount:,} {currency.upper()}"
    major, minor = divmod(amount, 10**digits)
    return f"{major:,}.{minor:0{digits}d} {currency.upper()}"


def create_router(stripe: StripeSandbox) -> APIRouter:
    router = APIRouter(prefix="/stripe/pay", include_in_schema=False)
    templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
    templates.env.filters["money"] = format_money

    def page(request: Request, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, "checkout.html", context, status_code=status)

    def not_found(request: Request) -> HTMLResponse:
        return page(request, 404, message="No such checkout session.")

    @router.get("/{session_id}")
    async def checkout_page(request: Request, session_id: str) -> HTMLResponse:
        try:
            session = stripe.get_session(session_id)
        except StripeError:
            return not_found(request)
        if session["status"] != "open":
            return page(request, message=MESSAGES[session["status"]])
        return page(request, session=session, line_items=stripe.line_items(session_id))

    async def complete(request: Request, session_id: str, *, delayed: bool) -> Response:
        try:
            session = stripe.get_session(session_id)
        except StripeError:
            return not_found(request)
        if session["status"] == "open":
            session = stripe.pay(session_id, delayed=delayed)
        # A second press (or a reload) of a paid session lands on the success page again.
        if session["status"] == "complete":
            url = session["success_url"].replace("{CHECKOUT_SESSION_ID}", session_id)
            return RedirectResponse(url, status_code=303)
        return page(request, 409, message=MESSAGES[session["status"]])

    @router.post("/{session_id}/pay")
    async def pay(request: Request, session_id: str) -> Response:
        return await complete(request, session_id, delayed=False)

    @router.post("/{session_id}/pay-delayed")
    async def pay_delayed(request: Request, session_id: str) -> Response:
        return await complete(request, session_id, delayed=True)

    @router.post("/{session_id}/cancel")
    async def cancel(request: Request, session_id: str) -> Response:
        try:
            session = stripe.get_session(session_id)
        except StripeError:
            return not_found(request)
        if session["cancel_url"]:
            return RedirectResponse(session["cancel_url"], status_code=303)
        return page(request, message="Payment cancelled. You can close this page.")

    return router
