"""Push concurrent video orders through a real stack and print what it costs.

    python -m bench.orders --orders 50 --videos 1
    python -m bench.orders --orders 50 --videos 3
    python -m bench.orders --api http://127.0.0.1:8000     # against `make dev`

By default the bench starts a throwaway stack of its own (`python -m workers.dev` with a
fresh data dir, free ports and 1 s sandbox generations) and removes it afterwards, so it
never touches the orders of a running `make dev`.

Each order goes the customer's way: create -> pay on the sandbox's hosted checkout ->
poll the order every 100 ms until it is final. Webhooks are timed twice, 50 concurrent
deliveries at a time: first deliveries, new events for the orders while they await
payment (each a real signal to a running workflow), and redeliveries of the sandbox's real
`checkout.session.completed` events once the orders are done, the way Stripe retries.
Last, every order's workflow history is fetched from Temporal to count events.

Targets: at most 40 history events for a one-video order plus 10 per extra video, and
webhook p99 under 50 ms with 50 concurrent deliveries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from sandbox.stripe_events import sign
from workers.settings import SANDBOX_STRIPE_KEY, load_settings
from workers.stack import REPO_ROOT, stop_embedded_postgres
from workflows.video_order import FINAL_STATUSES

POLL_SECONDS = 0.1
BENCH_WEBHOOK_SECRET = "whsec_bench"
EVENTS_TARGET_FIRST = 40
EVENTS_TARGET_EXTRA = 10
WEBHOOK_P99_TARGET_MS = 50.0


@dataclass
class Target:
    api_url: str
    sandbox_url: str
    temporal_address: str
    namespace: str
    webhook_secret: str
    stripe_key: str
    video_seconds: float | None


@dataclass
class OrderRun:
    order_id: str
    created_at: float
    paid_at: float | None = None
    final_at: float | None = None
    status: str = "new"
    error: str | None = None
    checkout_url: str = ""


def log(message: str) -> None:
    print(f"bench | {message}", file=sys.stderr, flush=True)


# --- a stack of our own ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Anything that would point the throwaway stack at real providers or at existing
# infrastructure: the bench measures the sandboxed stack it starts, nothing else.
_STRIPPED_ENV = (
    "TEMPORAL_ADDRESS",
    "DATABASE_URL",
    "STRIPE_API_KEY",
    "STRIPE_API_BASE",
    "STRIPE_WEBHOOK_SECRET",
    "SUPERDUPERAI_URL",
    "SUPERDUPERAI_TOKEN",
)


@contextlib.asynccontextmanager
async def own_stack(video_seconds: float, keep: bool) -> AsyncIterator[Target]:
    data_dir = Path(tempfile.mkdtemp(prefix="orderflow-bench-"))
    api_port, sandbox_port, temporal_port, ui_port = (_free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
    env.update(
        DATA_DIR=str(data_dir),
        SANDBOX_VIDEO_SECONDS=str(video_seconds),
        API_PORT=str(api_port),
        PUBLIC_URL=f"http://127.0.0.1:{api_port}",
        SANDBOX_PORT=str(sandbox_port),
        SANDBOX_URL=f"http://127.0.0.1:{sandbox_port}",
        STRIPE_WEBHOOK_SECRET=BENCH_WEBHOOK_SECRET,
        # The launcher runs in the temp dir so a developer's .env can't reach it; the
        # project's packages still resolve from the repository.
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    dev_log_path = data_dir / "dev.log"
    dev_log = dev_log_path.open("wb")
    log(f"starting a stack in {data_dir} (API on {api_port}, Temporal on {temporal_port})")
    started = time.monotonic()
    launcher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.dev",
        "--temporal-port",
        str(temporal_port),
        "--ui-port",
        str(ui_port),
        cwd=data_dir,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=dev_log,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await _wait_for_banner(launcher, dev_log_path, timeout=120)
        log(f"stack up in {time.monotonic() - started:.1f} s")
        yield Target(
            api_url=f"http://127.0.0.1:{api_port}",
            sandbox_url=f"http://127.0.0.1:{sandbox_port}",
            temporal_address=f"127.0.0.1:{temporal_port}",
            namespace="default",
            webhook_secret=BENCH_WEBHOOK_SECRET,
            stripe_key=SANDBOX_STRIPE_KEY,
            video_seconds=video_seconds,
        )
    finally:
        log("stopping the stack")
        if launcher.returncode is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(launcher.wait(), 60)
            except TimeoutError:
                launcher.kill()
                await launcher.wait()
        dev_log.close()
        # Normally the launcher stopped it; this covers a launcher that was killed.
        await asyncio.to_thread(stop_embedded_postgres, data_dir / "postgres")
        if keep:
            log(f"kept {data_dir} (launcher log: {dev_log_path})")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


async def _wait_for_banner(
    launcher: asyncio.subprocess.Process, log_path: Path, timeout: float
) -> None:
    # The launcher prints its banner only once the API answers and a worker polls.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(log_path.read_text, encoding="utf-8", errors="replace")
        if "dev stack is up" in text:
            return
        if launcher.returncode is not None:
            raise RuntimeError(f"the stack failed to start:\n{text[-4000:]}")
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the stack did not come up within {timeout:g} s; see {log_path}")


# --- orders ---------------------------------------------------------------------------


async def create_order(http: httpx.AsyncClient, target: Target, videos: int) -> OrderRun:
    created_at = time.perf_counter()
    response = await http.post(
        f"{target.api_url}/api/video-orders",
        json={"prompt": "a lighthouse in a storm, cinematic", "videos": videos},
    )
    if response.status_code != 201:
        run = OrderRun(order_id="", created_at=created_at, status="rejected")
        run.error = f"create: {response.status_code} {response.text[:200]}"
        return run
    body = response.json()
    run = OrderRun(order_id=body["order_id"], created_at=created_at)
    run.checkout_url = body["checkout_url"]
    return run


async def pay_and_wait(
    http: httpx.AsyncClient, target: Target, run: OrderRun, timeout: float
) -> None:
    if run.error:
        return
    # What the customer's browser does on the hosted checkout page.
    paid = await http.post(f"{run.checkout_url.rstrip('/')}/pay")
    if paid.status_code >= 400:
        run.status, run.error = "unpaid", f"pay: {paid.status_code} {paid.text[:200]}"
        return
    run.paid_at = time.perf_counter()
    # status_url is the customer's page; the bench polls the JSON view behind it.
    status_url = f"{target.api_url}/api/video-orders/{run.order_id}"
    deadline = run.paid_at + timeout
    while time.perf_counter() < deadline:
        view = await http.get(status_url)
        if view.status_code == 200:
            run.status = view.json()["status"]
            if run.status in FINAL_STATUSES:
                run.final_at = time.perf_counter()
                return
        await asyncio.sleep(POLL_SECONDS)
    run.error = f"not final after {timeout:g} s (last status {run.status})"


# --- webhooks -------------------------------------------------------------------------


async def completed_events(http: httpx.AsyncClient, target: Target) -> list[dict[str, Any]]:
    """The `checkout.session.completed` events the sandbox really sent for our orders."""
    response = await http.get(f"{target.sandbox_url}/stripe/_sandbox/deliveries")
    response.raise_for_status()
    ids = [d["event_id"] for d in response.json() if d["type"] == "checkout.session.completed"]
    auth = {"Authorization": f"Bearer {target.stripe_key}"}
    semaphore = asyncio.Semaphore(20)

    async def fetch(event_id: str) -> dict[str, Any]:
        async with semaphore:
            r = await http.get(f"{target.sandbox_url}/stripe/v1/events/{event_id}", headers=auth)
            r.raise_for_status()
            return r.json()

    return list(await asyncio.gather(*(fetch(i) for i in ids)))


class RawConnection:
    """One keep-alive HTTP/1.1 connection with nothing between the socket and the timer.

    httpx costs a few milliseconds of client CPU per request under concurrency; with 50
    requests in flight on the same cores as the stack, that alone came to p50 ~120 ms
    against a bare health check that answers in ~6 ms. The webhook figure must be the
    server's, so deliveries go out over plain sockets, one connection per concurrent
    sender as Stripe's would be.
    """

    def __init__(self, url: str) -> None:
        parts = httpx.URL(url)
        self.host = parts.host
        self.port = parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head += [f"Content-Length: {len(body)}", "", ""]
        self.writer.write("\r\n".join(head).encode() + body)
        await self.writer.drain()
        status_line, *header_lines = (
            (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        )
        status = int(status_line.split()[1])
        fields = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in header_lines if line)
        )
        if fields.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        else:
            await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def deliver_round(
    connections: Sequence[RawConnection], target: Target, events: Sequence[dict[str, Any]]
) -> list[tuple[float, int]]:
    """One delivery per connection, all at once; returns (milliseconds, status) each."""
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
        return (time.perf_counter() - t0) * 1000, status

    tasks = [
        asyncio.create_task(one(c, b, h)) for c, (b, h) in zip(connections, prepared, strict=True)
    ]
    await asyncio.sleep(0)  # let every task reach start.wait()
    start.set()
    return list(await asyncio.gather(*tasks))


# --- history --------------------------------------------------------------------------


async def history_lengths(target: Target, order_ids: Sequence[str]) -> list[int]:
    client = await Client.connect(target.temporal_address, namespace=target.namespace)
    semaphore = asyncio.Semaphore(20)

    async def one(order_id: str) -> int:
        async with semaphore:
            handle = client.get_workflow_handle(f"video-order:{order_id}")
            return len((await handle.fetch_history()).events)

    return list(await asyncio.gather(*(one(i) for i in order_ids)))


# --- report ---------------------------------------------------------------------------


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


async def measure_deliveries(
    target: Target, args: argparse.Namespace, make_events: Callable[[], list[dict[str, Any]]]
) -> tuple[list[float], Counter[int]]:
    """`args.rounds` measured rounds of `args.webhooks` concurrent deliveries."""
    timings: list[float] = []
    codes: Counter[int] = Counter()
    connections = [RawConnection(target.api_url) for _ in range(args.webhooks)]
    try:
        # One round first to open the connections; Stripe keeps its own warm too.
        await deliver_round(connections, target, make_events())
        for _ in range(args.rounds):
            for ms, code in await deliver_round(connections, target, make_events()):
                timings.append(ms)
                codes[code] += 1
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    return timings, codes


def pending_bank_transfer_events(runs: Sequence[OrderRun]) -> list[dict[str, Any]]:
    """Fresh events for orders still awaiting payment: checkout completed, money not yet in.

    Each is new to its order, so each costs a real signal to a running workflow: the
    path a first delivery takes. The orders stay payable afterwards.
    """
    events = []
    for run in runs:
        session_id = run.checkout_url.rstrip("/").rsplit("/", 1)[-1]
        session = {
            "id": session_id,
            "object": "checkout.session",
            "client_reference_id": run.order_id,
            "metadata": {"order_id": run.order_id},
            "payment_status": "unpaid",
            "status": "complete",
        }
        events.append(
            {
                "id": f"evt_bench_{uuid.uuid4().hex}",
                "object": "event",
                "type": "checkout.session.completed",
                "created": int(time.time()),
                "data": {"object": session},
            }
        )
    return events


async def bench(args: argparse.Namespace, target: Target) -> int:
    limits = httpx.Limits(max_connections=args.orders * 2 + 10)
    webhook_rows: list[tuple[str, list[float], Counter[int]]] = []
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        # Orders of their own for the first-delivery figure: the events it sends stay
        # out of the histories counted below.
        log(f"creating {args.webhooks} orders to receive first deliveries")
        targets = await asyncio.gather(
            *(create_order(http, target, 1) for _ in range(args.webhooks))
        )
        open_orders = [r for r in targets if not r.error]
        if open_orders:
            log(
                f"delivering new events to {len(open_orders)} open orders, "
                f"{args.webhooks} at a time"
            )
            timings, codes = await measure_deliveries(
                target, args, lambda: pending_bank_transfer_events(open_orders)
            )
            webhook_rows.append(("first delivery", timings, codes))

        log(f"creating {args.orders} orders of {args.videos} video(s)")
        started = time.perf_counter()
        runs = await asyncio.gather(
            *(create_order(http, target, args.videos) for _ in range(args.orders))
        )
        log("paying every order and waiting until it is final")
        await asyncio.gather(*(pay_and_wait(http, target, r, args.timeout) for r in runs))
        wall = time.perf_counter() - started

        events = await completed_events(http, target)
        if events:
            log(f"redelivering {len(events)} real events, {args.webhooks} at a time")
            timings, codes = await measure_deliveries(target, args, lambda: events)
            webhook_rows.append(("redelivery", timings, codes))

    finished = [r for r in runs if r.final_at is not None]
    problems = [r for r in runs if r.error]
    paid_to_final = [r.final_at - r.paid_at for r in finished if r.paid_at is not None]
    log("reading workflow histories")
    histories = await history_lengths(target, [r.order_id for r in runs if r.order_id])

    statuses = Counter(r.status for r in runs)
    events_target = EVENTS_TARGET_FIRST + EVENTS_TARGET_EXTRA * (args.videos - 1)
    generation = f"{target.video_seconds:g} s" if target.video_seconds else "as configured"
    p50_paid, p99_paid = percentile(paid_to_final, 50), percentile(paid_to_final, 99)
    rows: list[tuple[str, str]] = [
        ("orders", f"{len(finished)}/{args.orders} final ({_counts(statuses)})"),
        ("throughput", f"{len(finished) / wall:.2f} orders/s (wall {wall:.1f} s)"),
        ("payment -> final", f"p50 {p50_paid:.2f} s   p99 {p99_paid:.2f} s"),
    ]
    for label, timings, codes in webhook_rows:
        p50, p99 = percentile(timings, 50), percentile(timings, 99)
        met = verdict(p99 < WEBHOOK_P99_TARGET_MS)
        rows.append(
            (
                f"webhook {label} ({args.webhooks} concurrent)",
                f"p50 {p50:.1f} ms   p99 {p99:.1f} ms   "
                f"[target p99 < {WEBHOOK_P99_TARGET_MS:g} ms: {met}]   "
                f"responses {_counts(codes)}",
            )
        )
    if histories:
        met = verdict(max(histories) <= events_target)
        rows.append(
            (
                "history events/order",
                f"min {min(histories)}   median {statistics.median(histories):g}   "
                f"max {max(histories)}   [target <= {events_target}: {met}]",
            )
        )

    title = (
        f"orderflow bench: {args.orders} orders x {args.videos} video(s), generation {generation}"
    )
    width = max(len(k) for k, _ in rows)
    print()
    print(title)
    print("-" * len(title))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for run in problems[:10]:
        print(f"  ! order {run.order_id or '-'}: {run.error}")
    print()
    return 1 if problems else 0


def _counts(counter: Counter[Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: str(kv[0])))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.orders", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--orders", type=int, default=50, help="concurrent orders (default 50)")
    parser.add_argument("--videos", type=int, default=1, help="videos per order (default 1)")
    parser.add_argument(
        "--api", help="use a running stack at this URL instead of starting one (e.g. make dev)"
    )
    parser.add_argument("--webhooks", type=int, default=50, help="concurrent deliveries per round")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds of deliveries")
    parser.add_argument(
        "--video-seconds", type=float, default=1.0, help="sandbox generation time (own stack)"
    )
    parser.add_argument(
        "--timeout", type=float, default=180, help="seconds per order after payment"
    )
    parser.add_argument("--keep", action="store_true", help="keep the own stack's data dir")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.videos < 1 or args.webhooks < 1 or args.rounds < 1:
        parser.error("--orders, --videos, --webhooks and --rounds must be positive")
    return args


async def amain(args: argparse.Namespace) -> int:
    if args.api:
        # A running stack: the rest of its coordinates come from the same settings it uses.
        settings = load_settings()
        target = Target(
            api_url=args.api.rstrip("/"),
            sandbox_url=settings.sandbox_url.rstrip("/"),
            temporal_address=settings.temporal_address,
            namespace=settings.temporal_namespace,
            webhook_secret=settings.webhook_secret,
            stripe_key=settings.stripe_key,
            video_seconds=None,
        )
        return await bench(args, target)
    async with own_stack(args.video_seconds, args.keep) as target:
        return await bench(args, target)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
