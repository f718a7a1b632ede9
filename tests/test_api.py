"""Input validation: a bad request is a clear 4xx and starts nothing."""

from __future__ import annotations

import pytest

from tests.conftest import Stack


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"videos": 1}, "prompt"),
        ({"prompt": "", "videos": 1}, "prompt"),
        ({"prompt": "   ", "videos": 1}, "prompt"),
        ({"prompt": "x" * 2001, "videos": 1}, "prompt"),
        ({"prompt": "ok", "videos": 0}, "videos"),
        ({"prompt": "ok", "videos": 5}, "videos"),
        ({"prompt": "ok", "videos": "two"}, "videos"),
        ({"prompt": "ok", "videos": 1, "aspect_ratio": "4:3"}, "aspect_ratio"),
        ({"prompt": "ok", "videos": 1, "email": "not-an-email"}, "email"),
        ({"prompt": "ok", "videos": 1, "model": "bad model; drop"}, "model"),
        ({"prompt": "ok", "videos": 1, "price": 1}, "price"),
    ],
)
async def test_invalid_order_is_422_and_starts_no_workflow(
    stack: Stack, body: dict, field: str
) -> None:
    before = await stack.workflows_on_queue()
    resp = await stack.http.post("/api/video-orders", json=body)
    assert resp.status_code == 422
    data = resp.json()
    assert set(data) == {"error", "detail"}
    assert data["error"] == "invalid_request"
    assert field in data["detail"]
    assert await stack.workflows_on_queue() == before


async def test_malformed_json_is_422(stack: Stack) -> None:
    resp = await stack.http.post(
        "/api/video-orders", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422
    assert resp.json()["error"] == "invalid_request"


async def test_price_comes_from_settings_not_the_client(stack: Stack) -> None:
    order = await stack.create_order(videos=4, prompt="  four foxes  ")
    view = await stack.order(order["order_id"])
    assert view["amount_total"] == 4 * stack.settings.default_video_price
    assert view["prompt"] == "four foxes"
    assert len(order["order_id"]) >= 22  # 128 random bits, url-safe


async def test_unknown_model_is_422_naming_the_models_and_starts_no_workflow(
    stack: Stack,
) -> None:
    """Item 5: only the models of VIDEO_MODELS are sold; anything else starts nothing."""
    before = await stack.workflows_on_queue()
    body = {"prompt": "ok", "videos": 1, "model": "google-cloud/veo9-ultra"}
    resp = await stack.http.post("/api/video-orders", json=body)
    assert resp.status_code == 422
    data = resp.json()
    assert data["error"] == "invalid_request"
    assert data["detail"].startswith("model:")
    for model in stack.settings.video_model_prices:
        assert model in data["detail"]
    assert await stack.workflows_on_queue() == before


async def test_each_model_is_charged_its_own_price_at_stripe(stack: Stack) -> None:
    """Item 5: a model other than the default costs its own price, and that is what Stripe
    is asked to charge."""
    prices = stack.settings.video_model_prices
    default = stack.settings.default_video_model
    model = next(m for m in prices if m != default)
    assert prices[model] != prices[default]
    for chosen, expected in ((model, model), (None, default)):
        body = {"videos": 3} if chosen is None else {"videos": 3, "model": chosen}
        view = await stack.order((await stack.create_order(**body))["order_id"])
        assert view["model"] == expected
        assert view["amount_total"] == 3 * prices[expected]
        session = await stack.stripe.v1.checkout.sessions.retrieve_async(
            view["checkout_session_id"]
        )
        assert session.amount_total == 3 * prices[expected]
