"""Shop deadlines of days on the time-skipping test server: a prepaid order whose supplier
never delivers is refunded when its deadline passes. The activities still reach Postgres and
the sandbox over real connections; only Temporal's clock is skipped."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
from temporalio.testing import WorkflowEnvironment

from api.shop import ShopOrderCreate, TelegramUser, new_purchase
from tests.conftest import Stack
from tests.shopkit import Shop, new_user_id
from workers.settings import Settings
from workers.stack import find_binary
from workers.worker import activities, build_worker
from workflows.purchase import PurchaseView, PurchaseWorkflow, workflow_id


@pytest.fixture
async def skipping(stack: Stack) -> AsyncIterator[tuple[WorkflowEnvironment, Settings]]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_binary("temporal-test-server")
    )
    settings = stack.settings.model_copy(update={"task_queue": f"skip-{uuid.uuid4().hex[:8]}"})
    try:
        async with activities(settings) as bound, build_worker(env.client, settings, bound):
            yield env, settings
    finally:
        await env.shutdown()


async def test_prepaid_order_past_its_deadline_is_refunded(skipping, shop: Shop) -> None:
    env, settings = skipping
    supplier_id, token, supplier_chat = await shop.supplier()
    product = await shop.product(stock=0, made_to_order=True, hours=48, supplier_id=supplier_id)
    user = new_user_id()
    await shop.credit(user, 5_000)
    order = new_purchase(
        settings,
        TelegramUser(user, "Buyer", None),
        ShopOrderCreate(product_id=product, quantity=2, payment_method="balance"),
    )
    handle = await env.client.start_workflow(
        PurchaseWorkflow.run,
        order,
        id=workflow_id(order.order_id),
        task_queue=settings.task_queue,
    )
    result: PurchaseView = await handle.result()  # skips the 48 hours
    assert result.status == "refunded" and result.error_code == "supplier_late"
    assert result.order_type == "prepaid" and result.amount == 2 * 499
    assert [(r.method, r.status) for r in result.refunds] == [("balance", "succeeded")]
    me = await shop.me(user)
    assert me["balance"] == 5_000
    [row] = me["orders"]
    assert row["status"] == "refunded" and row["content"] is None
    # The supplier was told, the customer too; a fulfilment now is refused.
    await shop.wait_message(supplier_chat, order.order_id)
    await shop.wait_message(user, "did not deliver in time")
    resp = await shop.api.post(
        f"/api/suppliers/orders/{order.order_id}/fulfil",
        json={"content": "too late"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status_code == 409, resp.text


async def test_unpaid_prepaid_order_expires_and_a_late_window_closes(skipping, shop: Shop) -> None:
    env, settings = skipping
    supplier_id, _, _ = await shop.supplier()
    product = await shop.product(stock=0, made_to_order=True, supplier_id=supplier_id)
    user = new_user_id()
    order = new_purchase(
        settings,
        TelegramUser(user, "Buyer", None),
        ShopOrderCreate(product_id=product, quantity=1, payment_method="stars"),
    )
    order = dataclasses.replace(order, late_payment_seconds=86_400)
    handle = await env.client.start_workflow(
        PurchaseWorkflow.run, order, id=workflow_id(order.order_id), task_queue=settings.task_queue
    )
    result: PurchaseView = await handle.result()  # the 15 minutes and the day after
    assert result.status == "expired" and result.refunds == []
    assert (await shop.me(user))["orders"][0]["status"] == "expired"
