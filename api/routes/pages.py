"""Server-rendered pages: the order form, the live order page, session lookup, admin files.

Every page works without JavaScript except the admin page (its token must not travel in a
URL). Pages call the same service functions as the JSON API in api/orders.py; what lives
here is presentation only.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from api import orders
from api.deps import SettingsDep, TemporalClientDep
from api.errors import ApiError
from api.ratelimit import check_order_rate
from workers.settings import Settings

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
STATIC_DIR = _PACKAGE_DIR / "static"
templates = Jinja2Templates(directory=_PACKAGE_DIR / "templates")

# The page's order id is its only credential: it must not leak to video hosts or Stripe in
# a Referer header, and a shared cache must never keep a copy of the page.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    # Scripts and styles come only from /static; videos come from the provider's host.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: https: http:; media-src 'self' https: http:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
}

ASPECT_RATIOS = get_args(orders.VideoOrderCreate.model_fields["aspect_ratio"].annotation)
ASPECT_LABELS = {"16:9": "Landscape", "9:16": "Portrait", "1:1": "Square"}
FORM_FIELDS = ("prompt", "model", "videos", "aspect_ratio", "email")
# A hidden field of the form: a fresh random Idempotency-Key per rendered form, so that a
# double submit (or a retry after a lost answer) lands on the order the first one made.
FORM_KEY_FIELD = "idempotency_key"
# Errors after which the form's key still stands for nothing or for an order a retry should
# find; after any other (a key used for another order, a failed checkout) a retry needs a
# new key to be a new order.
KEEP_KEY_STATUSES = frozenset({422, 429, 503})
FORM_DEFAULTS = {"videos": "1", "aspect_ratio": ASPECT_RATIOS[0]}
FIELD_LABELS = {
    "prompt": "Prompt",
    "model": "Model",
    "videos": "Number of videos",
    "aspect_ratio": "Aspect ratio",
    "email": "Email",
}
# Shared with order.js (as JSON) so the live page and the server speak the same words.
VIDEO_LABELS = {
    "pending": "Waiting",
    "generating": "Generating",
    "retrying": "Retrying",
    "completed": "Ready",
    "failed": "Failed",
}

# Stripe's minor-unit exponents: https://docs.stripe.com/currencies#zero-decimal
_ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
_THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())
_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "inr": "₹", "krw": "₩"}


def money_style(currency: str) -> dict[str, Any]:
    """How to print amounts of a currency; order.js formats live amounts with the same dict."""
    currency = currency.lower()
    digits = 0 if currency in _ZERO_DECIMAL else 3 if currency in _THREE_DECIMAL else 2
    symbol = _SYMBOLS.get(currency)
    return {
        "prefix": symbol or "",
        "suffix": "" if symbol else f" {currency.upper()}",
        "digits": digits,
    }


def format_money(amount: int, currency: str) -> str:
    style = money_style(currency)
    digits = style["digits"]
    return f"{style['prefix']}{Decimal(amount).scaleb(-digits):,.{digits}f}{style['suffix']}"


def format_time(value: str | int | None) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, int):
        moment = datetime.fromtimestamp(value, UTC)
    else:
        moment = datetime.fromisoformat(value).astimezone(UTC)
    return moment.strftime("%d %b %Y, %H:%M UTC")


templates.env.filters["money"] = format_money
templates.env.filters["when"] = format_time


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    return templates.TemplateResponse(
        request, name, context, status_code=status, headers=PAGE_HEADERS
    )


def error_page(request: Request, status: int, message: str) -> Response:
    return render(request, "error.html", {"status": status, "message": message}, status)


class PageRoute(APIRoute):
    """Answers errors with an HTML page; the app-wide handlers answer JSON for the API."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as err:
                return error_page(request, err.status, err.detail)
            except RequestValidationError:
                return error_page(request, 400, "That address is not one this site makes.")

        return handle


router = APIRouter(tags=["pages"], include_in_schema=False, route_class=PageRoute)


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# --- the order form ---------------------------------------------------------------------


def _form_page(
    request: Request,
    settings: Settings,
    values: dict[str, str],
    errors: list[str] | None = None,
    invalid: frozenset[str] = frozenset(),
    status: int = 200,
    key: str | None = None,
) -> Response:
    context = {
        "values": {**FORM_DEFAULTS, "model": settings.default_video_model, **values},
        "idempotency_key": key or secrets.token_urlsafe(16),
        "errors": errors or [],
        "invalid": invalid,
        "max_videos": settings.max_videos_per_order,
        "models": settings.video_model_prices,
        "currency": settings.video_currency,
        "aspect_ratios": [(r, ASPECT_LABELS.get(r, r)) for r in ASPECT_RATIOS],
    }
    return render(request, "form.html", context, status)


def _describe(err: ValidationError) -> tuple[list[str], frozenset[str]]:
    """Pydantic's errors in words for customers, and the fields to mark invalid."""
    messages, fields = [], set()
    for item in err.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        label = FIELD_LABELS.get(field, field)
        fields.add(field)
        if item["type"] in ("missing", "string_too_short"):
            messages.append(f"{label} is required.")
        else:
            messages.append(f"{label}: {item['msg'].removeprefix('Value error, ')}")
    return messages, frozenset(fields)


@router.get("/")
async def order_form(request: Request, settings: SettingsDep) -> Response:
    return _form_page(request, settings, {})


@router.post("/orders")
async def submit_order(
    request: Request, settings: SettingsDep, temporal: TemporalClientDep
) -> Response:
    async with request.form() as form:
        # Absent fields stay absent so that the model's defaults apply, as in the JSON API.
        values = {name: str(form[name]) for name in FORM_FIELDS if name in form}
        # A form from before the key existed (or a script) orders without one.
        key = str(form.get(FORM_KEY_FIELD) or "") or None
    try:
        body = orders.VideoOrderCreate.model_validate(values)
        # The same path as the JSON API's Idempotency-Key: same order id, same fingerprint.
        order = orders.new_order(settings, body, key)
        created = await orders.create_order(
            temporal, settings, order, admit=lambda: check_order_rate(request)
        )
    except ValidationError as err:
        messages, invalid = _describe(err)
        return _form_page(request, settings, values, messages, invalid, 422, key)
    except ApiError as err:
        # Too many videos or orders, or Stripe or Temporal down: keep what the customer
        # typed so that fixing it or retrying is one click.
        keep = key if err.status in KEEP_KEY_STATUSES else None
        message = err.detail
        if err.error == "idempotency_conflict":
            # Sent once already, then changed (after Back, say): sent again, it is a new order.
            message = "This form already placed another order. Send it again for a new one."
        page = _form_page(request, settings, values, [message], frozenset(), err.status, keep)
        page.headers.update(err.headers)
        return page
    # A resubmit of an order past paying goes to its page rather than to a stale checkout.
    target = created.checkout_url or orders.order_page_url(settings, created.order_id)
    return RedirectResponse(target, status_code=303)


# --- the order page ---------------------------------------------------------------------


@router.get("/orders/{order_id}")
async def order_page(
    request: Request,
    order_id: str,
    temporal: TemporalClientDep,
    cancelled: bool = False,
    session_id: str | None = None,
) -> Response:
    order = await orders.read_order(temporal, order_id)
    context = {
        "order": order,
        "cancelled": cancelled,
        # Back from Stripe's success_url: the webhook that confirms payment may still be
        # on its way, so the page says "confirming" rather than offering to pay again.
        "returned": bool(session_id),
        "money_style": money_style(order["currency"]),
        "video_labels": VIDEO_LABELS,
    }
    return render(request, "order.html", context)


# --- finding an order -------------------------------------------------------------------


@router.get("/lookup")
async def lookup(
    request: Request,
    settings: SettingsDep,
    temporal: TemporalClientDep,
    session_id: str = "",
) -> Response:
    session_id = session_id.strip()
    if not session_id:
        return render(request, "lookup.html", {"session_id": "", "not_found": False})
    order_id = await orders.find_order_by_session(temporal, session_id)
    if order_id is None:
        context = {"session_id": session_id, "not_found": True}
        return render(request, "lookup.html", context, 404)
    return RedirectResponse(orders.order_page_url(settings, order_id), status_code=303)


# --- operators --------------------------------------------------------------------------


@router.get("/admin")
async def admin_files(request: Request, settings: SettingsDep) -> Response:
    # The token is checked by the JSON API the page calls; here we only know whether one
    # is configured at all.
    return render(request, "admin.html", {"enabled": bool(settings.admin_token)})


# --- the shop's Mini App ----------------------------------------------------------------

TELEGRAM_WEB_APP_JS = "https://telegram.org/js/telegram-web-app.js"
_SANDBOX_USER_DEFAULT = 1001


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@router.get("/app")
async def miniapp(request: Request, settings: SettingsDep, user: str | None = None) -> Response:
    """The Mini App: everything it shows comes from /api/shop with the initData that
    Telegram's script (or, in the sandbox, its stand-in) provides."""
    if settings.telegram_sandboxed:
        # In a plain browser during development: act as the user in ?user= (digits only).
        user_id = int(user) if user and user.isdigit() and len(user) <= 15 else None
        script = (
            f"{settings.sandbox_url.rstrip('/')}/webapp/telegram-web-app.js"
            f"?user_id={user_id or _SANDBOX_USER_DEFAULT}"
        )
    else:
        script = TELEGRAM_WEB_APP_JS
    script_origin = _origin(script)
    headers = {
        **PAGE_HEADERS,
        # Telegram's web clients show a Mini App in a frame; its script (or the sandbox's
        # stand-in, which also pays invoices on the sandbox) is the only other origin.
        "Content-Security-Policy": (
            f"default-src 'self'; script-src 'self' {script_origin}; "
            f"connect-src 'self' {script_origin}; img-src 'self' data: https:; "
            "object-src 'none'; base-uri 'none'; "
            "frame-ancestors https://web.telegram.org https://*.telegram.org"
        ),
    }
    return templates.TemplateResponse(
        request,
        "miniapp.html",
        {"webapp_script": script, "currency": settings.shop_currency},
        headers=headers,
    )
