"""The sales assistant's figures (`python -m bench --figures h`).

h. 50 customers (`--chats`) each write four messages to the bot through the sandbox's
   Telegram (a greeting, a request for a product, thanks, their orders), each waiting for
   the answer before the next, all chats at once: messages per second through the chat
   workflows with the sandbox's model thinking `--model-seconds` per call. The baseline is
   one customer alone, in the same run. Reply latency is from sending a message to the
   bot's first answer, less the model's own time for that message (its calls' `model_ms`,
   recorded per call in Postgres); and the history events the chats' workflows wrote, all
   runs counted, per 100 messages.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import asyncpg
import httpx
from temporalio.client import Client

from bench.orders import Report, Row, percentile, ratio
from bench.stack import Target, log

FIRST_CHAT = 8_900_000_000
# Idle connections are dropped before uvicorn's 5 s keep-alive ends: a request sent on one
# the server is closing fails with ReadError, and a message must not be sent twice.
LIMITS = httpx.Limits(max_connections=60, keepalive_expiry=2.0)
# How often a customer looks at the chat for the answer (the latencies' resolution).
POLL_SECONDS = 0.05
# What each customer writes, and how many messages the bot answers it with (an offer
# follows the assistant's words).
SCRIPT = (("привет", 1), ("хочу {code}", 2), ("спасибо", 1), ("мои заказы", 1))


async def chats(args: Any, target: Target, report: Report) -> None:
    if target.database_url is None:
        report.problems.append("h: needs DATABASE_URL of the stack's database (model times)")
        return
    admin = {"Authorization": f"Bearer {target.admin_token}"}
    code = "zq" + uuid.uuid4().hex[:6]
    async with (
        httpx.AsyncClient(base_url=target.api_url, timeout=60, limits=LIMITS) as api,
        httpx.AsyncClient(base_url=target.sandbox_url, timeout=60, limits=LIMITS) as sandbox,
    ):
        created = await api.post(
            "/api/admin/products",
            json={"name": f"Bench guide {code}", "price": 300, "made_to_order": False},
            headers=admin,
        )
        created.raise_for_status()
        product = created.json()["id"]
        added = await api.post(
            f"/api/admin/products/{product}/stock",
            json={"items": [f"BENCH-CHAT-{i}" for i in range(args.chats + 1)]},
            headers=admin,
        )
        added.raise_for_status()
        await sandbox.post("/gemini/_sandbox/latency", json={"seconds": args.model_seconds})
        first = FIRST_CHAT + int(time.time()) % 100_000 * 1000
        try:
            log("h: one chat alone (baseline)")
            alone = await _conversations(sandbox, [first], code)
            log(f"h: {args.chats} chats at once")
            together = await _conversations(
                sandbox, [first + 1 + i for i in range(args.chats)], code
            )
        finally:
            await sandbox.post("/gemini/_sandbox/latency", json={"seconds": 0})
    model = await _model_seconds(target.database_url)
    client = await Client.connect(target.temporal_address, namespace=target.namespace)
    events = 0
    ours = {f"chat:{first + i}" for i in range(args.chats + 1)}
    # Every run of each chat (continue-as-new closes one and opens the next).
    async for wf in client.list_workflows("WorkflowType = 'ChatWorkflow'"):
        if wf.id in ours:
            events += (
                await client.get_workflow_handle(wf.id, run_id=wf.run_id).describe()
            ).raw_description.workflow_execution_info.history_length
    messages = len(together.replies) + len(alone.replies)

    def net(replies: dict[tuple[int, int], float]) -> list[float]:
        return [max(0.0, took - model.get(key, 0.0)) for key, took in replies.items()]

    rate_alone = len(alone.replies) / alone.elapsed
    rate = len(together.replies) / together.elapsed
    report.add(
        "h",
        Row(
            f"h. chat messages/s ({args.chats} chats, model {args.model_seconds:g} s a call)",
            f"{rate:.1f}/s",
            f"{rate_alone:.1f}/s (one chat)",
            ratio(rate, rate_alone),
        ),
    )
    measured = net(together.replies)
    base = net(alone.replies)
    report.add(
        "h",
        Row(
            "h. reply latency less the model's time, p50 / p99",
            f"{percentile(measured, 50) * 1000:.0f} / {percentile(measured, 99) * 1000:.0f} ms",
            f"{percentile(base, 50) * 1000:.0f} / {percentile(base, 99) * 1000:.0f} ms",
        ),
    )
    report.add(
        "h",
        Row("h. chat history events per 100 messages", f"{events * 100 / messages:.0f}"),
    )


class _Run:
    def __init__(self) -> None:
        self.replies: dict[tuple[int, int], float] = {}  # (chat, update id) -> seconds
        self.elapsed = 0.0


async def _conversations(sandbox: httpx.AsyncClient, chat_ids: list[int], code: str) -> _Run:
    run = _Run()

    async def one(chat_id: int) -> None:
        expected = 0
        for text, answers in SCRIPT:
            sent = time.perf_counter()
            resp = await sandbox.post(
                f"/telegram/_sandbox/users/{chat_id}/messages",
                json={"text": text.format(code=code)},
            )
            resp.raise_for_status()
            update_id = resp.json()["update_id"]
            first = expected + 1
            expected += answers
            while True:
                try:
                    resp = await sandbox.get(f"/telegram/_sandbox/chats/{chat_id}/messages")
                except httpx.TransportError:
                    await asyncio.sleep(POLL_SECONDS)  # the sandbox busy: ask again
                    continue
                got = len(resp.json())
                if got >= first and (chat_id, update_id) not in run.replies:
                    run.replies[(chat_id, update_id)] = time.perf_counter() - sent
                if got >= expected:
                    break
                await asyncio.sleep(POLL_SECONDS)

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in chat_ids))
    run.elapsed = time.perf_counter() - started
    return run


async def _model_seconds(database_url: str) -> dict[tuple[int, int], float]:
    """The model's own time per message: its calls' model_ms, by (chat, update id)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT call_key, model_ms FROM assistant_model_calls WHERE call_key LIKE 'chat:%'"
        )
    finally:
        await conn.close()
    total: dict[tuple[int, int], float] = {}
    for row in rows:
        _, chat, update, _round = row["call_key"].split(":")
        key = (int(chat), int(update))
        total[key] = total.get(key, 0.0) + row["model_ms"] / 1000
    return total


def chat_figures(args: Any, target: Target, report: Report) -> list[Awaitable[None]]:
    return [chats(args, target, report)] if "h" in args.figures else []
