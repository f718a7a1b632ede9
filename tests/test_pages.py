"""The server-rendered pages over real HTTP: HTML answers, status codes, and a form that
shares the JSON API's validation (a bad form is a 422 page and starts nothing)."""

from __future__ import annotations

import re

import httpx
import pytest

from api.routes.pages import format_money
from tests.conftest import Stack


def _html(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    return resp.text


async def test_order_form_renders(stack: Stack) -> None:
    page = _html(await stack.http.get("/"), 200)
    assert '<meta name="viewport"' in page
    assert '<form class="stack" method="post" action="/orders">' in page
    for field in ("prompt", "videos", "email"):
        assert f'<label for="{field}">' in page and f'id="{field}" name="{field}"' in page
    top = stack.settings.max_videos_per_order
    assert f'<option value="{top}"' in page and f'<option value="{top + 1}"' not in page
    for ratio in ("16:9", "9:16", "1:1"):
        assert f'value="{ratio}"' in page
    # Item 5: every model on sale, each with its own price per video; no totals that would
    # be wrong for another model.
    assert "<legend>Model</legend>" in page
    assert "$5.00 per video" in page and "$15.00 per video" in page
    for model, price in stack.settings.video_model_prices.items():
        assert f'value="{model}"' in page
        assert f"{model} <span class=\"muted\">{format_money(price, 'usd')} per video" in page
    default = stack.settings.default_video_model
    assert re.search(rf'value="{re.escape(default)}" required\s+checked', page)
    assert "$10.00" not in page


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"prompt": "  ", "videos": "1"}, "Prompt is required."),
        ({"prompt": "a fox", "videos": "0"}, "Number of videos:"),
        ({"prompt": "a fox", "videos": "99"}, "at most 4 videos per order"),
        ({"prompt": "a fox", "videos": "1", "aspect_ratio": "4:3"}, "Aspect ratio:"),
        ({"prompt": "a fox", "videos": "1", "email": "nope"}, "not a valid email address"),
    ],
)
async def test_invalid_form_is_a_422_page_and_starts_nothing(
    stack: Stack, form: dict[str, str], message: str
) -> None:
    before = await stack.workflows_on_queue()
    page = _html(await stack.http.post("/orders", data=form), 422)
    assert message in page
    assert f">{form['prompt']}</textarea>" in page  # what the customer typed is kept
    assert await stack.workflows_on_queue() == before


async def test_chosen_model_survives_a_form_error_and_makes_the_videos(stack: Stack) -> None:
    """Item 5: the model picked on the form is kept on an error, charged at its own price
    and sent to SuperDuperAI."""
    default = stack.settings.default_video_model
    model, price = next(
        (m, p) for m, p in stack.settings.video_model_prices.items() if m != default
    )
    form = {"prompt": " ", "model": model, "videos": "2"}
    page = _html(await stack.http.post("/orders", data=form), 422)
    assert re.search(rf'value="{re.escape(model)}" required\s+checked', page)
    assert not re.search(rf'value="{re.escape(default)}" required\s+checked', page)

    resp = await stack.http.post("/orders", data={**form, "prompt": "a glass city at night"})
    assert resp.status_code == 303
    session_id = resp.headers["location"].rsplit("/", 1)[1]
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(session_id)
    assert session.amount_total == 2 * price
    order_id = session.client_reference_id
    page = _html(await stack.http.get(f"/orders/{order_id}"), 200)
    assert f"<dt>Model</dt><dd>{model}</dd>" in page

    await stack.pay(session_id)
    done = await stack.wait_for(order_id)
    assert done["status"] == "completed" and done["model"] == model
    async with httpx.AsyncClient(base_url=stack.sandbox_url) as sandbox:
        auth = {"Authorization": f"Bearer {stack.settings.superduperai_key}"}
        for video in done["videos"]:
            file = await sandbox.get(f"/superduperai/api/v1/file/{video['file_id']}", headers=auth)
            assert file.json()["config"]["generation_config_name"] == model


async def test_form_pays_on_checkout_and_the_order_page_follows(stack: Stack) -> None:
    form = {"prompt": "two <i>foxes</i>", "videos": "2", "aspect_ratio": "9:16", "email": ""}
    resp = await stack.http.post("/orders", data=form)
    assert resp.status_code == 303
    checkout_url = resp.headers["location"]
    assert checkout_url.startswith(f"{stack.sandbox_url}/stripe/pay/cs_")
    session_id = checkout_url.rsplit("/", 1)[1]

    # The lookup page finds the order by its Checkout Session.
    resp = await stack.http.get("/lookup", params={"session_id": session_id})
    assert resp.status_code == 303
    order_url = resp.headers["location"]
    assert order_url.startswith(f"{stack.api_url}/orders/")
    order_id = order_url.rsplit("/", 1)[1]

    resp = await stack.http.get(f"/orders/{order_id}")
    page = _html(resp, 200)
    # The id in the URL is the order's credential: it must not leak or be cached.
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["referrer-policy"] == "same-origin"
    assert "Waiting for payment." in page
    assert f'href="{checkout_url}"' in page and "Pay $10.00" in page
    assert "two &lt;i&gt;foxes&lt;/i&gt;" in page  # the prompt is text, never markup
    assert "2 \N{MULTIPLICATION SIGN} 9:16" in page

    page = _html(await stack.http.get(f"/orders/{order_id}", params={"cancelled": "1"}), 200)
    assert "Payment cancelled." in page and f'href="{checkout_url}"' in page

    # Back from Stripe before the webhook: no second "Pay" button.
    page = _html(
        await stack.http.get(f"/orders/{order_id}", params={"session_id": session_id}), 200
    )
    assert "Confirming your payment" in page and f'href="{checkout_url}"' not in page


async def test_unknown_order_is_a_404_page(stack: Stack) -> None:
    for order_id in ("A" * 22, "short", "bad$id!"):
        page = _html(await stack.http.get(f"/orders/{order_id}"), 404)
        assert "Not found" in page and 'href="/lookup"' in page


async def test_lookup_of_an_unknown_session(stack: Stack) -> None:
    page = _html(await stack.http.get("/lookup"), 200)
    assert '<label for="session_id">' in page and "No order was found" not in page
    for session_id in ("cs_test_doesnotexist", "not-a-session"):
        resp = await stack.http.get("/lookup", params={"session_id": session_id})
        page = _html(resp, 404)
        assert f"No order was found for <code>{session_id}</code>" in page


async def test_admin_page_and_static_files(stack: Stack) -> None:
    page = _html(await stack.http.get("/admin"), 200)
    assert 'id="admin-token"' in page and 'src="/static/admin.js"' in page
    for name, kind in (
        ("style.css", "text/css"),
        ("order.js", "javascript"),
        ("admin.js", "javascript"),
    ):
        resp = await stack.http.get(f"/static/{name}")
        assert resp.status_code == 200 and kind in resp.headers["content-type"]


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (500, "usd", "$5.00"),
        (123456, "eur", "€1,234.56"),
        (500, "jpy", "¥500"),
        (500, "chf", "5.00 CHF"),
        (1500, "kwd", "1.500 KWD"),
    ],
)
def test_money_is_printed_in_major_units(amount: int, currency: str, text: str) -> None:
    assert format_money(amount, currency) == text
