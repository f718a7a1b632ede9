"""Where the bench runs: a throwaway stack of its own, or one already running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from workers.settings import SANDBOX_STRIPE_KEY, load_settings
from workers.stack import REPO_ROOT, start_embedded_postgres, stop_embedded_postgres

BENCH_WEBHOOK_SECRET = "whsec_bench"

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
    "ADMIN_TOKEN",
    "IDEMPOTENCY_SECRET",
)

# The bench opens hundreds of streams and creates hundreds of orders from one address:
# the limits that protect a real shop from one visitor are raised for it.
_LOAD_ENV = {
    "STREAM_MAX_PER_CLIENT": "5000",
    "STREAM_MAX_TOTAL": "5000",
    "STREAM_MAX_SECONDS": "3600",
    "ORDER_RATE_LIMIT": "100000/minute",
}

# Sockets for hundreds of streams, on both ends: the stack inherits this process's limit.
_WANTED_FILES = 8192


@dataclass
class Target:
    api_url: str
    sandbox_url: str
    temporal_address: str
    namespace: str
    webhook_secret: str
    stripe_key: str
    admin_token: str | None
    # The own stack's knobs; None when the bench runs against a stack it did not start.
    video_seconds: float | None = None
    poll_seconds: float | None = None
    # The own stack's launcher and data dir: where its processes' CPU time is found.
    launcher_pid: int | None = None
    data_dir: Path | None = None
    # The stack's Postgres, for the shop's reservation figures (bench/shop.py).
    database_url: str | None = None


def log(message: str) -> None:
    print(f"bench | {message}", file=sys.stderr, flush=True)


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _WANTED_FILES if hard == resource.RLIM_INFINITY else min(_WANTED_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_stack(api_url: str) -> Target:
    """A stack someone else started (`make dev`): its coordinates from the same settings."""
    settings = load_settings()
    token = settings.admin_token
    token_file = Path(settings.data_dir) / "admin_token"
    if token is None and token_file.exists():
        token = token_file.read_text().strip()
    return Target(
        api_url=api_url.rstrip("/"),
        sandbox_url=settings.sandbox_url.rstrip("/"),
        temporal_address=settings.temporal_address,
        namespace=settings.temporal_namespace,
        webhook_secret=settings.webhook_secret,
        stripe_key=settings.stripe_key,
        admin_token=token,
        # make dev's own Postgres when DATABASE_URL is unset.
        database_url=settings.database_url or _dev_database(Path(settings.data_dir)),
    )


def _dev_database(data_dir: Path) -> str | None:
    if not (data_dir / "postgres").is_dir():
        return None
    return start_embedded_postgres(data_dir / "postgres", stop_at_exit=False)


@contextlib.asynccontextmanager
async def own_stack(video_seconds: float, poll_seconds: float, keep: bool) -> AsyncIterator[Target]:
    """`python -m workers.dev` in a fresh data dir on free ports, removed afterwards."""
    raise_file_limit()
    data_dir = Path(tempfile.mkdtemp(prefix="orderflow-bench-"))
    api_port, sandbox_port, temporal_port, ui_port = (_free_port() for _ in range(4))
    admin_token = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
    env.update(_LOAD_ENV)
    env.update(
        DATA_DIR=str(data_dir),
        # Generation as short as the sandbox allows and polled as often: what remains of a
        # video order's time is orchestration, the stack's services and their round trips.
        SANDBOX_VIDEO_SECONDS=str(video_seconds),
        GENERATION_POLL_SECONDS=str(poll_seconds),
        API_PORT=str(api_port),
        PUBLIC_URL=f"http://127.0.0.1:{api_port}",
        SANDBOX_PORT=str(sandbox_port),
        SANDBOX_URL=f"http://127.0.0.1:{sandbox_port}",
        STRIPE_WEBHOOK_SECRET=BENCH_WEBHOOK_SECRET,
        ADMIN_TOKEN=admin_token,
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
        # Adopts the server the launcher started (it stays the launcher's to stop).
        database_url = await asyncio.to_thread(
            start_embedded_postgres, data_dir / "postgres", stop_at_exit=False
        )
        yield Target(
            api_url=f"http://127.0.0.1:{api_port}",
            sandbox_url=f"http://127.0.0.1:{sandbox_port}",
            temporal_address=f"127.0.0.1:{temporal_port}",
            namespace="default",
            webhook_secret=BENCH_WEBHOOK_SECRET,
            stripe_key=SANDBOX_STRIPE_KEY,
            admin_token=admin_token,
            video_seconds=video_seconds,
            poll_seconds=poll_seconds,
            launcher_pid=launcher.pid,
            data_dir=data_dir,
            database_url=database_url,
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


# --- where the CPU goes -----------------------------------------------------------------

_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Which part of the stack a process is, by its command line.
# First match wins: the launcher's command line names Temporal's port too.
_ROLES = (
    ("workers.dev", "launcher"),
    ("workers.api", "api"),
    ("workers.worker", "worker"),
    ("-m sandbox", "sandbox"),
    ("postgres", "postgres"),
    ("temporal", "temporal"),
)


def cpu_seconds(target: Target) -> dict[str, float]:
    """CPU seconds used so far by each part of the own stack and by this process.

    Empty without /proc or for a stack the bench did not start. Read before and after a
    run, it says which process an order's time went to.
    """
    usage: dict[str, float] = {}
    if target.launcher_pid is None or target.data_dir is None or not _PROC.is_dir():
        return usage
    stats: dict[int, tuple[int, float, str]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: fields follow the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        ppid, ticks = int(fields[1]), int(fields[11]) + int(fields[12])
        stats[int(entry.name)] = (ppid, ticks / _TICK, cmdline)
    # PostgreSQL detaches from the launcher; its postmaster is known by its data dir.
    roots = {target.launcher_pid} | {
        pid for pid, (_, _, cmd) in stats.items() if f"-D {target.data_dir}" in cmd
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
        _, cpu, cmd = stats[pid]
        role = next((r for key, r in _ROLES if key in cmd), "other")
        usage[role] = usage.get(role, 0.0) + cpu
    own = os.times()
    usage["bench"] = own.user + own.system
    return usage
