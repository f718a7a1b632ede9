"""Long timers on the time-skipping test server: checkout expiry and the generation deadline.

The time-skipping server has no updates, so these start the workflow directly and read
the checkout from its query; the activities still reach the sandbox over real HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from api.orders import VideoOrderCreate, new_order
from tests.conftest import Stack
from workers.settings import Settings
from workers.stack import find_binary
from workers.worker import activities, build_worker
from workflows.video_order import OrderView, StripeEvent, VideoOrderWorkflow, workflow_id


@pytest.fixture
async def skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    # One server per test: skipped time stays skipped, and Stripe checks expires_at
    # against the real clock.
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_binary("temporal-test-server")
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
async def skipping(
    skipping_env: WorkflowEnvironment, stack: Stack
) -> AsyncIterator[tuple[WorkflowEnvironment, Settings]]:
    settings = stack.settings.model_copy(update={"task_queue": f"skip-{uuid.uuid4().hex[:8]}"})
    async with activities(settings) as bound, build_worker(skipping_env.client, settings, bound):
        yield skipping_env, settings


async def _start(
    env: WorkflowEnvironment,
    settings: Settings,
    prompt: str,
    videos: int = 1,
    email: str | None = None,
) -> tuple[WorkflowHandle, OrderView]:
    order = new_order(settings, VideoOrderCreate(prompt=prompt, videos=videos, email=email))
    handle = await env.client.start_workflow(
        VideoOrderWorkflow.run,
        order,
        id=workflow_id(order.order_id),
        task_queue=settings.task_queue,
    )
    for _ in range(100):
        view = await handle.query(VideoOrderWorkflow.view)
        if view.checkout_session_id:
            return handle, view
        await asyncio.sleep(0.1)
    raise AssertionError("checkout session never created")


async def test_unpaid_order_expires_at_the_session_deadline(skipping, stack: Stack) -> None:
    env, settings = skipping
    handle, view = await _start(env, settings, "a quiet harbour")
    result: OrderView = await handle.result()  # skips the 30 minutes and the late window
    assert result.status == "expired"
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(view.checkout_session_id)
    assert session.status == "expired"  # the workflow expired it at Stripe too
    assert result.refunded_amount == 0


async def test_lost_webhook_is_recovered_from_stripe_at_expiry(skipping, stack: Stack) -> None:
    env, settings = skipping
    handle, view = await _start(env, settings, "a paper boat")
    # The customer pays, but the webhook never reaches this workflow.
    assert (await stack.pay(view.checkout_session_id)).status_code == 303
    result: OrderView = await handle.result()
    assert result.status == "completed"
    assert result.videos[0].url


async def test_stalled_generation_times_out_and_is_refunded(
    skipping, stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    env, settings = skipping
    caplog.set_level(logging.DEBUG, logger="temporalio.activity")
    # Attempts that end at once hand every wait back to the server, where time skips.
    settings = settings.model_copy(
        update={"generation_poll_seconds": 30.0, "generation_poll_window_seconds": 0.0}
    )
    handle, view = await _start(env, settings, "an endless corridor #stall", videos=2)
    await stack.pay(view.checkout_session_id)
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(view.checkout_session_id)
    await handle.signal(
        VideoOrderWorkflow.stripe_event,
        StripeEvent(
            event_id="evt_paid",
            type="checkout.session.completed",
            session_id=session.id,
            payment_status=session.payment_status,
            payment_intent=session.payment_intent,
            amount_total=session.amount_total,
        ),
    )
    result: OrderView = await handle.result()  # skips the 15 minute generation deadline
    assert result.status == "refunded"
    assert [v.error_code for v in result.videos] == ["generation_timed_out"] * 2
    assert [v.error for v in result.videos] == ["This video took too long to make."] * 2
    assert result.refunded_amount == 2 * settings.default_video_price
    refunds = await stack.refunds(session.payment_intent)
    assert sorted(r.amount for r in refunds) == [settings.default_video_price] * 2

    # Item 9: the attempts that ended as GenerationPending (dozens here) are the polling
    # design, not failures: debug lines only, never a warning.
    pending = [r for r in caplog.records if "GenerationPending" in (r.exc_text or "")]
    assert pending and all(r.levelno == logging.DEBUG for r in pending)
    warned = [r for r in caplog.records if r.name == "temporalio.activity" and r.levelno >= 30]
    assert not [r for r in warned if "GenerationPending" in (r.exc_text or r.getMessage())]


async def _payment_status(stack: Stack, session_id: str, wanted: str) -> None:
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(session_id)
    deadline = time.monotonic() + 20
    while (
        await stack.stripe.v1.payment_intents.retrieve_async(session.payment_intent)
    ).status != wanted:
        assert time.monotonic() < deadline, f"payment never became {wanted}"
        await asyncio.sleep(0.2)


async def test_lost_async_payment_failure_is_read_from_stripe(skipping, stack: Stack) -> None:
    """Item 3: the bank transfer fails but its webhook never reaches the order: the order
    reads the PaymentIntent while it waits, and fails (nothing was charged)."""
    env, settings = skipping
    handle, view = await _start(env, settings, "a dry well", email="buyer+fail@example.com")
    assert (await stack.pay(view.checkout_session_id, "pay-delayed")).status_code == 303
    await _payment_status(stack, view.checkout_session_id, "requires_payment_method")
    result: OrderView = await handle.result()  # skips the session's expiry and a check
    assert result.status == "failed"
    assert result.error_code == "payment_failed"
    assert result.videos[0].file_id is None


async def test_delayed_payment_that_never_settles_is_not_awaited_for_ever(
    skipping, stack: Stack
) -> None:
    """Item 3: a bank transfer that stays processing past the 14-day window leaves the order
    needing attention (and open for the payment), not waiting silently for ever."""
    env, settings = skipping
    handle, view = await _start(env, settings, "a held cheque", email="buyer+hold@example.com")
    assert (await stack.pay(view.checkout_session_id, "pay-delayed")).status_code == 303
    await env.sleep(timedelta(days=13))
    assert (await handle.query(VideoOrderWorkflow.view)).status == "awaiting_payment"
    await env.sleep(timedelta(days=2))
    state: OrderView = await handle.query(VideoOrderWorkflow.view)
    assert state.status == "needs_attention"
    assert state.attention_code == "payment_unresolved"
    await handle.terminate("test over")
