"""Video orders on a real stack, each figure next to a baseline measured in the same run.

    python -m bench                                   # everything, on a throwaway stack
    python -m bench --orders 300 --videos 3 --figures a
    python -m bench --api http://127.0.0.1:8000       # against a running `make dev`

By default the bench starts a stack of its own (`python -m workers.dev` with a fresh data
dir, free ports, sandbox generations of 0.01 s polled every 0.1 s, the per-address limits
raised) and removes it afterwards, so it never touches the orders of a running `make dev`.
It prints one table: figure | measured | baseline | ratio | target | verdict.

a. Throughput: `--orders` video orders, `--concurrency` in flight, each the customer's way
   (POST /api/video-orders, pay on the sandbox's hosted checkout, whose signed webhook
   signals the workflow) until the workflow's result. Baseline: bench/skeleton.py, the same
   workflow shape with activities that do nothing, on its own worker and task queue in this
   process and the same Temporal server, started with update-with-start and paid with a
   client signal, at the same concurrency; run before and after the video orders, the mean
   of the two. With generation cut to nothing, the ratio is what everything but the
   orchestration costs; the CPU each process spent per order says where it went. The same
   runs give payment -> final and history events per order. Target >= 0.8x.
b. Webhook first delivery: `--concurrency` open orders each get a new signed
   `checkout.session.completed` with the payment still pending (a real signal to a running
   workflow that changes nothing), all at once over raw sockets, `--rounds` times. Baseline:
   the same signal to the same orders at the same concurrency with `handle.signal(...)` from
   a Temporal client here, rounds alternating. Target p99 <= 1.5x.
c. Payment -> the order page's stream: the same orders, each with its stream
   (GET /api/video-orders/{id}/events) open, paid on the hosted checkout one every
   `--pay-gap` s; from sending the payment to the stream showing a status past
   `awaiting_payment`. `paid` itself is never visible to a read: the workflow starts
   generating in the workflow task that takes the payment, so the stream shows `generating`,
   or `completed` when the order finished between two reads. Target p99 < 300 ms.
d. Watchers: `--concurrency` fresh orders, one stream each and then `--watchers` streams
   over the same orders; Temporal reads per second (the API's `order_reads_total` at
   GET /api/admin/metrics) over `--window` s with each. Then the orders are paid as in c:
   delay until every watcher of an order shows the payment, against c's one watcher.
   Target: reads grow with orders, not watchers (500 watchers at most 1.5x the reads of 50).

b, c and d run first: the sandbox rewrites its whole JSON store on every change, so it
slows down with every order it holds, and the latency figures should not measure that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from temporalio.client import Client, WorkflowHandle

from bench import skeleton
from bench.stack import Target, cpu_seconds, log, own_stack, running_stack
from bench.wire import OrderStream, RawConnection
from sandbox.stripe_events import sign
from workflows.video_order import StripeEvent, VideoOrderWorkflow, workflow_id

EVENTS_TARGET_FIRST = 40
EVENTS_TARGET_EXTRA = 10
THROUGHPUT_TARGET = 0.8
WEBHOOK_RATIO_TARGET = 1.5
REDELIVERY_P99_TARGET_MS = 50.0
STREAM_P99_TARGET_MS = 300.0
READS_RATIO_TARGET = 1.5
PROMPT = "a lighthouse in a storm, cinematic"
AWAITING = "awaiting_payment"
# The first watchers of d's orders arrive over this long: about one STREAM_POLL_SECONDS.
STREAM_SPREAD_SECONDS = 1.0


@dataclass
class OrderRun:
    order_id: str = ""
    started_at: float = 0.0
    paid_at: float | None = None
    final_at: float | None = None
    status: str = "new"
    error: str | None = None


@dataclass
class OpenOrder:
    """An order awaiting payment: what its customer and Stripe know about it."""

    order_id: str
    session_id: str
    pay_path: str


@dataclass
class Row:
    figure: str
    measured: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    verdict: str = "-"


@dataclass
class Report:
    rows: list[tuple[str, Row]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, figure: str, row: Row) -> None:
        self.rows.append((figure, row))

    def ordered(self) -> list[Row]:
        """By figure (a, b, c, d), whatever order they were measured in."""
        return [row for _, row in sorted(self.rows, key=lambda pair: pair[0])]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def ratio(measured: float, baseline: float) -> str:
    return f"{measured / baseline:.2f}x" if baseline and math.isfinite(baseline) else "-"


def _counts(counter: Counter[Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: str(kv[0])))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


# --- orders, the customer's way ---------------------------------------------------------


class Customers:
    """Keep-alive connections to the API and the sandbox, one pair per concurrent customer."""

    def __init__(self, target: Target, size: int) -> None:
        self._free: asyncio.Queue[tuple[RawConnection, RawConnection]] = asyncio.Queue()
        self._all = [
            (RawConnection(target.api_url), RawConnection(target.sandbox_url)) for _ in range(size)
        ]
        for pair in self._all:
            self._free.put_nowait(pair)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[tuple[RawConnection, RawConnection]]:
        pair = await self._free.get()
        try:
            yield pair
        finally:
            self._free.put_nowait(pair)

    async def create(self, videos: int) -> OpenOrder:
        async with self.connection() as (api, _):
            status, body = await api.post_json(
                "/api/video-orders", {"prompt": PROMPT, "videos": videos}
            )
        if status != 201:
            raise RuntimeError(f"create: {status} {json.dumps(body)[:200]}")
        checkout = httpx.URL(body["checkout_url"])
        return OpenOrder(
            order_id=body["order_id"],
            session_id=checkout.path.rstrip("/").rsplit("/", 1)[-1],
            pay_path=checkout.path.rstrip("/") + "/pay",
        )

    async def pay(self, order: OpenOrder) -> None:
        """What the customer's browser does on the hosted checkout page."""
        async with self.connection() as (_, sandbox):
            status, body = await sandbox.request("POST", order.pay_path)
        if status >= 400:
            raise RuntimeError(f"pay: {status} {body[:200]!r}")

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for pair in self._all for c in pair))


async def closed_loop(
    total: int, concurrency: int, one: Callable[[], Awaitable[OrderRun]]
) -> tuple[list[OrderRun], float]:
    """`total` orders, `concurrency` in flight: each finished order makes room for the next."""
    remaining = iter(range(total))
    runs: list[OrderRun] = []

    async def slot() -> None:
        for _ in remaining:
            runs.append(await one())

    started = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(min(total, concurrency))))
    return runs, time.perf_counter() - started


async def video_order(
    customers: Customers, client: Client, videos: int, timeout: float
) -> OrderRun:
    run = OrderRun(started_at=time.perf_counter())
    try:
        order = await customers.create(videos)
        run.order_id = order.order_id
        run.paid_at = time.perf_counter()
        await customers.pay(order)
        handle = client.get_workflow_handle(workflow_id(order.order_id))
        result = await asyncio.wait_for(handle.result(), timeout)
        run.status = result["status"]
        run.final_at = time.perf_counter()
    except Exception as err:
        run.error = f"{type(err).__name__}: {err}"
    return run


async def skeleton_order(client: Client, task_queue: str, videos: int, timeout: float) -> OrderRun:
    run = OrderRun(started_at=time.perf_counter())
    try:
        handle, checkout = await skeleton.start_order(client, task_queue, videos)
        run.order_id = checkout.order_id
        run.paid_at = time.perf_counter()
        await handle.signal(
            skeleton.SkeletonOrderWorkflow.stripe_event, skeleton.paid_event(checkout)
        )
        run.status = await asyncio.wait_for(handle.result(), timeout)
        run.final_at = time.perf_counter()
    except Exception as err:
        run.error = f"{type(err).__name__}: {err}"
    return run


async def history_lengths(client: Client, workflow_ids: Sequence[str]) -> list[int]:
    gate = asyncio.Semaphore(20)

    async def one(wid: str) -> int:
        async with gate:
            return len((await client.get_workflow_handle(wid).fetch_history()).events)

    return list(await asyncio.gather(*(one(w) for w in workflow_ids)))


async def throughput(
    args: argparse.Namespace,
    target: Target,
    client: Client,
    customers: Customers,
    report: Report,
) -> None:
    """Figure a, with payment -> final and history events from the same runs."""
    task_queue = f"bench-skeleton-{uuid.uuid4().hex[:8]}"
    warmup = min(args.concurrency, 10)

    def video() -> Awaitable[OrderRun]:
        return video_order(customers, client, args.videos, args.timeout)

    def bare() -> Awaitable[OrderRun]:
        return skeleton_order(client, task_queue, args.videos, args.timeout)

    async with skeleton.skeleton_worker(client, task_queue):
        log(f"warming up: {warmup} skeleton and {warmup} video orders")
        await closed_loop(warmup, warmup, bare)
        await closed_loop(warmup, warmup, video)
        sizes = f"{args.orders} orders, {args.concurrency} at a time"
        log(f"skeleton: {sizes}")
        cpu = [cpu_seconds(target)]
        bare_runs, bare_wall = await closed_loop(args.orders, args.concurrency, bare)
        cpu.append(cpu_seconds(target))
        log(f"video orders: {sizes}")
        video_runs, video_wall = await closed_loop(args.orders, args.concurrency, video)
        cpu.append(cpu_seconds(target))
        log(f"skeleton again: {sizes}")
        bare_runs2, bare_wall2 = await closed_loop(args.orders, args.concurrency, bare)

    for runs in (video_runs, bare_runs, bare_runs2):
        report.problems += [f"order {r.order_id or '-'}: {r.error}" for r in runs if r.error]
    video_done = [r for r in video_runs if r.final_at is not None]
    video_rate = len(video_done) / video_wall
    bare_rates = [
        len([r for r in runs if r.final_at is not None]) / wall
        for runs, wall in ((bare_runs, bare_wall), (bare_runs2, bare_wall2))
    ]
    bare_rate = statistics.mean(bare_rates)
    report.add(
        "a",
        Row(
            f"a. throughput ({args.concurrency} in flight)",
            f"{video_rate:.1f} orders/s",
            f"{bare_rate:.1f} orders/s",
            ratio(video_rate, bare_rate),
            f">= {THROUGHPUT_TARGET:g}x",
            verdict(video_rate >= THROUGHPUT_TARGET * bare_rate),
        ),
    )
    statuses = Counter(r.status for r in video_runs)
    report.notes.append(
        f"a. video orders: {len(video_done)}/{args.orders} final ({_counts(statuses)}) in "
        f"{video_wall:.1f} s; skeleton runs {bare_rates[0]:.1f} and {bare_rates[1]:.1f} "
        f"orders/s (baseline: their mean)"
    )

    if cpu[0]:
        for name, before, after in (("video", cpu[1], cpu[2]), ("skeleton", cpu[0], cpu[1])):
            per_order = {
                role: (after[role] - before.get(role, 0.0)) * 1000 / args.orders for role in after
            }
            busy = sorted(((v, k) for k, v in per_order.items() if v >= 0.5), reverse=True)
            report.notes.append(
                f"a. CPU per {name} order: "
                + ", ".join(f"{role} {ms:.0f} ms" for ms, role in busy)
                + (" (bench: the driver and the skeleton's worker)" if name == "skeleton" else "")
            )

    def paid_to_final(runs: list[OrderRun]) -> list[float]:
        return [r.final_at - r.paid_at for r in runs if r.final_at and r.paid_at]

    video_pf, bare_pf = paid_to_final(video_runs), paid_to_final(bare_runs + bare_runs2)
    for q in (50, 99):
        measured, base = percentile(video_pf, q), percentile(bare_pf, q)
        report.add(
            "a", Row(f"   payment -> final p{q}", _ms(measured), _ms(base), ratio(measured, base))
        )

    log("reading workflow histories")
    sample = args.concurrency
    video_events = await history_lengths(
        client, [workflow_id(r.order_id) for r in video_done[:sample]]
    )
    bare_events = await history_lengths(
        client, [skeleton.workflow_id(r.order_id) for r in bare_runs if r.final_at][:sample]
    )
    if video_events and bare_events:
        limit = EVENTS_TARGET_FIRST + EVENTS_TARGET_EXTRA * (args.videos - 1)
        report.add(
            "a",
            Row(
                "   history events/order (max)",
                str(max(video_events)),
                str(max(bare_events)),
                ratio(max(video_events), max(bare_events)),
                f"<= {limit}",
                verdict(max(video_events) <= limit),
            ),
        )


# --- webhooks ---------------------------------------------------------------------------


def pending_payment_event(order: OpenOrder) -> dict[str, Any]:
    """A new event for an order awaiting payment: checkout completed, the money not yet in.

    Each is new to its order, so each costs a real signal to a running workflow: the path a
    first delivery takes. The order stays payable afterwards.
    """
    session = {
        "id": order.session_id,
        "object": "checkout.session",
        "client_reference_id": order.order_id,
        "metadata": {"order_id": order.order_id},
        "payment_status": "unpaid",
        "status": "complete",
    }
    return {
        "id": f"evt_bench_{uuid.uuid4().hex}",
        "object": "event",
        "type": "checkout.session.completed",
        "created": int(time.time()),
        "data": {"object": session},
    }


async def deliver_round(
    connections: Sequence[RawConnection], target: Target, events: Sequence[dict[str, Any]]
) -> list[tuple[float, int]]:
    """One delivery per connection, all at once; returns (seconds, status) each."""
    # Bodies and signatures are ready before the first request leaves, so the timings
    # cover the round trip and the handler, not our own JSON work.
    prepared = []
    for i in range(len(connections)):
        body = json.dumps(events[i % len(events)]).encode()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign(body, target.webhook_secret),
        }
        prepared.append((body, headers))
    start = asyncio.Event()

    async def one(conn: RawConnection, body: bytes, headers: dict[str, str]) -> tuple[float, int]:
        await start.wait()
        t0 = time.perf_counter()
        status = await conn.post("/webhooks/stripe", body, headers)
        return time.perf_counter() - t0, status

    tasks = [
        asyncio.create_task(one(c, b, h)) for c, (b, h) in zip(connections, prepared, strict=True)
    ]
    await asyncio.sleep(0)  # let every task reach start.wait()
    start.set()
    return list(await asyncio.gather(*tasks))


async def signal_round(client: Client, orders: Sequence[OpenOrder]) -> list[float]:
    """What the webhook handler ends in, sent straight from a client: one signal per order."""
    prepared = [
        (
            client.get_workflow_handle(workflow_id(o.order_id)),
            StripeEvent(
                event_id=f"evt_bench_{uuid.uuid4().hex}",
                type="checkout.session.completed",
                session_id=o.session_id,
                payment_status="unpaid",
            ),
        )
        for o in orders
    ]
    start = asyncio.Event()

    async def one(handle: WorkflowHandle, event: StripeEvent) -> float:
        await start.wait()
        t0 = time.perf_counter()
        await handle.signal(VideoOrderWorkflow.stripe_event, event)
        return time.perf_counter() - t0

    tasks = [asyncio.create_task(one(h, e)) for h, e in prepared]
    await asyncio.sleep(0)
    start.set()
    return list(await asyncio.gather(*tasks))


async def first_deliveries(
    args: argparse.Namespace,
    target: Target,
    client: Client,
    orders: Sequence[OpenOrder],
    report: Report,
) -> None:
    """Figure b."""
    log(f"first deliveries vs client signals: {len(orders)} orders, {args.rounds} rounds each")
    connections = [RawConnection(target.api_url) for _ in orders]
    webhook: list[float] = []
    signals: list[float] = []
    codes: Counter[int] = Counter()
    try:
        # One round of each first, unmeasured: connections open, caches warm, as Stripe's
        # and the API's own client would be.
        await deliver_round(connections, target, [pending_payment_event(o) for o in orders])
        await signal_round(client, orders)
        for _ in range(args.rounds):
            events = [pending_payment_event(o) for o in orders]
            for seconds, code in await deliver_round(connections, target, events):
                webhook.append(seconds)
                codes[code] += 1
            signals += await signal_round(client, orders)
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    label = f"b. webhook first delivery ({len(orders)} at once)"
    for q in (99, 50):
        measured, base = percentile(webhook, q), percentile(signals, q)
        met = q != 99 or measured <= WEBHOOK_RATIO_TARGET * base
        report.add(
            "b",
            Row(
                f"{label} p{q}" if q == 99 else f"   webhook first delivery p{q}",
                f"{measured * 1000:.1f} ms",
                f"{base * 1000:.1f} ms",
                ratio(measured, base),
                f"<= {WEBHOOK_RATIO_TARGET:g}x" if q == 99 else "-",
                verdict(met) if q == 99 else "-",
            ),
        )
    report.notes.append(
        f"b. {len(webhook)} deliveries (responses {_counts(codes)}) and {len(signals)} "
        "client signals; baseline: the signals"
    )
    if set(codes) != {200}:
        report.problems.append(f"webhook responses {_counts(codes)}")


async def redeliveries(
    args: argparse.Namespace, target: Target, http: httpx.AsyncClient, report: Report
) -> None:
    """Stripe's retries of events the API already handed to Temporal."""
    response = await http.get(f"{target.sandbox_url}/stripe/_sandbox/deliveries")
    response.raise_for_status()
    ids = [d["event_id"] for d in response.json() if d["type"] == "checkout.session.completed"]
    ids = ids[: args.concurrency * args.rounds]
    if not ids:
        return
    auth = {"Authorization": f"Bearer {target.stripe_key}"}
    gate = asyncio.Semaphore(20)

    async def fetch(event_id: str) -> dict[str, Any]:
        async with gate:
            r = await http.get(f"{target.sandbox_url}/stripe/v1/events/{event_id}", headers=auth)
            r.raise_for_status()
            return r.json()

    events = list(await asyncio.gather(*(fetch(i) for i in ids)))
    log(f"redelivering {len(events)} real events, {args.concurrency} at a time")
    connections = [RawConnection(target.api_url) for _ in range(args.concurrency)]
    timings: list[float] = []
    try:
        await deliver_round(connections, target, events)
        for i in range(args.rounds):
            batch = events[i * args.concurrency :] + events[: i * args.concurrency]
            timings += [s for s, _ in await deliver_round(connections, target, batch)]
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    p99 = percentile(timings, 99)
    report.add(
        "a",
        Row(
            "   webhook redelivery p99",
            f"{p99 * 1000:.1f} ms",
            target=f"< {REDELIVERY_P99_TARGET_MS:g} ms",
            verdict=verdict(p99 * 1000 < REDELIVERY_P99_TARGET_MS),
        ),
    )


# --- streams ----------------------------------------------------------------------------


async def open_streams(
    target: Target, order_ids: Sequence[str], spread: float = 0.0, timeout: float = 60
) -> list[OrderStream]:
    """One stream per id, each open with its first event before this returns.

    With `spread`, the streams open evenly over that many seconds, as visitors arrive: the
    readers they start then read at different moments, so reads counted over a window do
    not jump by a whole round of orders with where the window starts.
    """
    streams: list[OrderStream] = []
    # A page at a time would take long; all at once would measure a thundering herd.
    for i in range(0, len(order_ids), 50):
        batch = []
        for order_id in order_ids[i : i + 50]:
            batch.append(OrderStream(target.api_url, order_id).start())
            if spread:
                await asyncio.sleep(spread / len(order_ids))
        await asyncio.wait_for(asyncio.gather(*(s.opened.wait() for s in batch)), timeout)
        streams += batch
    failed = [s for s in streams if s.error or not s.statuses]
    if failed:
        await asyncio.gather(*(s.close() for s in streams))
        raise RuntimeError(
            f"{len(failed)} of {len(streams)} streams did not open: {failed[0].error}"
        )
    return streams


async def pay_paced(
    customers: Customers, orders: Sequence[OpenOrder], gap: float
) -> dict[str, float]:
    """Pays each order, one every `gap` s; returns when each payment was sent."""
    sent: dict[str, float] = {}

    async def one(i: int, order: OpenOrder) -> None:
        await asyncio.sleep(i * gap)
        sent[order.order_id] = time.perf_counter()
        await customers.pay(order)

    await asyncio.gather(*(one(i, o) for i, o in enumerate(orders)))
    return sent


async def stream_delays(
    streams: Sequence[OrderStream], sent: dict[str, float], timeout: float
) -> tuple[dict[str, list[float]], int]:
    """Per order, each of its watchers' delay from payment to a status past awaiting."""
    seen = await asyncio.gather(*(s.wait_past(AWAITING, timeout) for s in streams))
    delays: dict[str, list[float]] = {}
    missing = 0
    for stream, at in zip(streams, seen, strict=True):
        if at is None:
            missing += 1
        else:
            delays.setdefault(stream.order_id, []).append(at - sent[stream.order_id])
    return delays, missing


def first_statuses(streams: Sequence[OrderStream]) -> Counter[str]:
    return Counter(
        next((s for _, s in stream.statuses if s != AWAITING), "none") for stream in streams
    )


async def payment_to_stream(
    args: argparse.Namespace,
    target: Target,
    customers: Customers,
    orders: Sequence[OpenOrder],
    report: Report,
) -> float:
    """Figure c; returns its p99 (the one-watcher baseline of figure d)."""
    log(f"payment -> stream: {len(orders)} orders, one stream each")
    streams = await open_streams(target, [o.order_id for o in orders])
    try:
        sent = await pay_paced(customers, orders, args.pay_gap)
        delays, missing = await stream_delays(streams, sent, args.timeout)
    finally:
        await asyncio.gather(*(s.close() for s in streams))
    values = [d for ds in delays.values() for d in ds]
    p50, p99 = percentile(values, 50), percentile(values, 99)
    report.add("c", Row("c. payment -> stream p50", _ms(p50)))
    report.add(
        "c",
        Row(
            "   payment -> stream p99",
            _ms(p99),
            target=f"< {STREAM_P99_TARGET_MS:g} ms",
            verdict=verdict(p99 * 1000 < STREAM_P99_TARGET_MS and not missing),
        ),
    )
    report.notes.append(
        f"c. first status past {AWAITING} on the streams: {_counts(first_statuses(streams))}"
    )
    if missing:
        report.problems.append(f"c. {missing} streams never showed the payment")
    return p99


async def reads_total(http: httpx.AsyncClient, target: Target) -> float | None:
    if not target.admin_token:
        return None
    response = await http.get(
        f"{target.api_url}/api/admin/metrics",
        headers={"Authorization": f"Bearer {target.admin_token}"},
    )
    if response.status_code != 200:
        return None
    value = response.json().get("order_reads_total")
    return float(value) if isinstance(value, int | float) else None


async def reads_per_second(http: httpx.AsyncClient, target: Target, window: float) -> float | None:
    # A moment for the readers of streams just opened to settle into their rhythm.
    await asyncio.sleep(1.0)
    before = await reads_total(http, target)
    started = time.perf_counter()
    await asyncio.sleep(window)
    after = await reads_total(http, target)
    if before is None or after is None:
        return None
    return (after - before) / (time.perf_counter() - started)


async def watchers(
    args: argparse.Namespace,
    target: Target,
    http: httpx.AsyncClient,
    customers: Customers,
    orders: Sequence[OpenOrder],
    one_watcher_p99: float,
    report: Report,
) -> None:
    """Figure d."""
    ids = [o.order_id for o in orders]
    per_order = max(1, args.watchers // len(ids))
    log(f"watchers: {len(ids)} streams on {len(ids)} orders, reads over {args.window:g} s")
    streams = await open_streams(target, ids, spread=STREAM_SPREAD_SECONDS)
    try:
        few = await reads_per_second(http, target, args.window)
        log(f"watchers: {per_order * len(ids)} streams on the same orders")
        streams += await open_streams(target, ids * (per_order - 1))
        many = await reads_per_second(http, target, args.window)
        log("watchers: paying the orders")
        sent = await pay_paced(customers, orders, args.pay_gap)
        delays, missing = await stream_delays(streams, sent, args.timeout)
    finally:
        await asyncio.gather(*(s.close() for s in streams))

    label = f"d. Temporal reads/s, {len(streams)} watchers"
    if few is None or many is None:
        report.add("d", Row(label, "n/a", verdict="n/a"))
        report.notes.append("d. no order_reads_total at GET /api/admin/metrics")
    else:
        report.add(
            "d",
            Row(
                label,
                f"{many:.1f}/s",
                f"{few:.1f}/s ({len(ids)} watchers)",
                ratio(many, few),
                f"<= {READS_RATIO_TARGET:g}x",
                verdict(many <= READS_RATIO_TARGET * few),
            ),
        )
        report.notes.append(
            f"d. {len(ids)} orders: {few / len(ids):.2f} reads/s per order with one watcher "
            f"each, {many / len(ids):.2f} with {per_order} each"
        )
    everyone = [max(ds) for ds in delays.values() if len(ds) == per_order]
    each = [d for ds in delays.values() for d in ds]
    p99_all = percentile(everyone, 99)
    report.add(
        "d",
        Row(
            "   stream event delay p99 (all watchers)",
            _ms(p99_all),
            f"{_ms(one_watcher_p99)} (1 watcher)" if math.isfinite(one_watcher_p99) else "-",
            ratio(p99_all, one_watcher_p99),
            f"< {STREAM_P99_TARGET_MS:g} ms",
            verdict(p99_all * 1000 < STREAM_P99_TARGET_MS and not missing),
        ),
    )
    report.notes.append(
        f"d. delay p99 per watcher {_ms(percentile(each, 99))}, p50 "
        f"{_ms(percentile(each, 50))}; until every watcher of an order has it: p50 "
        f"{_ms(percentile(everyone, 50))}"
    )
    if missing:
        report.problems.append(f"d. {missing} watchers never showed the payment")


# --- the run ----------------------------------------------------------------------------


async def create_orders(customers: Customers, count: int) -> list[OpenOrder]:
    return list(await asyncio.gather(*(customers.create(1) for _ in range(count))))


async def settle(client: Client, orders: Sequence[OpenOrder], timeout: float) -> None:
    """Until the paid orders' workflows have finished: the next figure starts on a quiet
    stack, not on the tail of this one's generations."""
    handles = [client.get_workflow_handle(workflow_id(o.order_id)) for o in orders]
    await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout)


async def bench(args: argparse.Namespace, target: Target) -> int:
    report = Report()
    client = await Client.connect(target.temporal_address, namespace=target.namespace)
    customers = Customers(target, args.concurrency)
    limits = httpx.Limits(max_connections=50)

    async def measure(figure: str, work: Awaitable[Any]) -> Any:
        # A figure that cannot be measured (a refused stream, a failed order) is reported
        # and the others still are.
        try:
            return await work
        except Exception as err:
            report.problems.append(f"{figure}: {type(err).__name__}: {err}")
            return None

    try:
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            # The latency figures first, while the sandbox's store is small: it rewrites
            # its whole JSON document on every change, so each order makes it slower.
            one_watcher = float("nan")
            if {"b", "c"} & set(args.figures):
                log(f"creating {args.concurrency} orders to pay later")
                waiting = await measure("b, c", create_orders(customers, args.concurrency))
                if waiting and "b" in args.figures:
                    await measure("b", first_deliveries(args, target, client, waiting, report))
                if waiting and "c" in args.figures:
                    one_watcher = await measure(
                        "c", payment_to_stream(args, target, customers, waiting, report)
                    ) or float("nan")
                    await measure("c", settle(client, waiting, args.timeout))
            if "d" in args.figures:
                fresh = await measure("d", create_orders(customers, args.concurrency))
                if fresh:
                    await measure(
                        "d",
                        watchers(args, target, http, customers, fresh, one_watcher, report),
                    )
                    await measure("d", settle(client, fresh, args.timeout))
            if "a" in args.figures:
                await measure("a", throughput(args, target, client, customers, report))
                await measure("a", redeliveries(args, target, http, report))
            # The shop's figures (bench/shop.py), on the same stack.
            from bench.shop import shop_figures

            for work in shop_figures(args, target, report):
                await measure("e-g", work)
            # The sales assistant's (bench/chat.py).
            from bench.chat import chat_figures

            for work in chat_figures(args, target, report):
                await measure("h", work)
            if "i" in args.figures:
                from bench.search import search_figures

                if target.database_url is None:
                    report.problems.append("i: needs DATABASE_URL of the stack's database")
                else:
                    await measure("i", search_figures(target.database_url, report))
    finally:
        await customers.close()
    print_report(args, target, report)
    return 1 if report.problems else 0


def print_report(args: argparse.Namespace, target: Target, report: Report) -> None:
    header = Row("figure", "measured", "baseline", "ratio", "target", "verdict")
    rows = [header, *report.ordered()]
    cells = [[r.figure, r.measured, r.baseline, r.ratio, r.target, r.verdict] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(6)]
    generation = (
        f"generation {target.video_seconds:g} s, polled every {target.poll_seconds:g} s"
        if target.video_seconds is not None
        else f"against {target.api_url}"
    )
    title = (
        f"orderflow bench: {args.orders} orders x {args.videos} video(s), "
        f"{args.concurrency} concurrent, {args.watchers} watchers; {generation}"
    )
    lines = ["", title, ""]
    for i, row in enumerate(cells):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    lines.append("")
    lines += sorted(report.notes, key=lambda note: note[:2])
    lines += [f"  ! {p}" for p in report.problems[:10]]
    print("\n".join(lines) + "\n", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Video orders on a real stack, each figure next to a same-run baseline.",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=50,
        help="orders in flight, deliveries at once, orders watched (default 50)",
    )
    parser.add_argument(
        "--orders", type=int, default=150, help="orders per throughput run (default 150)"
    )
    parser.add_argument("--videos", type=int, default=1, help="videos per order (default 1)")
    parser.add_argument(
        "--watchers", type=int, default=500, help="streams on the watched orders (default 500)"
    )
    parser.add_argument(
        "--rounds", type=int, default=8, help="measured rounds of deliveries (default 8)"
    )
    parser.add_argument(
        "--pay-gap",
        type=float,
        default=0.3,
        help="seconds between payments in c and d (default %(default)s)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=5.0,
        help="seconds over which reads/s are counted (default %(default)s)",
    )
    parser.add_argument(
        "--figures", default="abcdefghi", help="which figures to measure (default abcdefghi: all)"
    )
    parser.add_argument(
        "--stock",
        type=int,
        default=2000,
        help="units of the hot product in each reservation run (e) (default %(default)s)",
    )
    parser.add_argument(
        "--shop-orders",
        type=int,
        default=100,
        help="Stars purchases end to end (g) (default %(default)s)",
    )
    parser.add_argument(
        "--chats", type=int, default=50, help="customers chatting at once (h) (default %(default)s)"
    )
    parser.add_argument(
        "--model-seconds",
        type=float,
        default=0.2,
        help="how long the sandbox's model thinks per call (h) (default %(default)s)",
    )
    parser.add_argument(
        "--api", help="use a running stack at this URL instead of starting one (e.g. make dev)"
    )
    parser.add_argument(
        "--video-seconds",
        type=float,
        default=0.01,
        help="sandbox generation time (own stack) (default %(default)s)",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=0.1,
        help="generation poll interval (own stack) (default %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds per order (default %(default)s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the own stack's data dir")
    args = parser.parse_args(argv)
    if not args.figures or set(args.figures) - set("abcdefghi"):
        parser.error("--figures takes letters among a to i")
    if min(args.concurrency, args.orders, args.videos, args.rounds, args.watchers) < 1:
        parser.error("--concurrency, --orders, --videos, --rounds and --watchers must be positive")
    return args


async def amain(args: argparse.Namespace) -> int:
    if args.api:
        return await bench(args, running_stack(args.api))
    async with own_stack(args.video_seconds, args.poll_seconds, args.keep) as target:
        return await bench(args, target)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
