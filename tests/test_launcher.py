"""`make dev` as a person runs it, in a terminal (item 8 of issue 5).

One real launcher (`python -m workers.dev`) on a pseudo-terminal that is its controlling
terminal, as in a terminal window: a second launcher on the same data directory is refused
while the first keeps serving, and closing the terminal stops the whole stack.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from workers.settings import Settings
from workers.stack import stop_embedded_postgres

REPO_ROOT = Path(__file__).resolve().parent.parent
BANNER = "dev stack is up"


def launcher_env(data_dir: Path, api_port: int, sandbox_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(
        DATA_DIR=str(data_dir),
        API_PORT=str(api_port),
        PUBLIC_URL=f"http://127.0.0.1:{api_port}",
        SANDBOX_PORT=str(sandbox_port),
        SANDBOX_URL=f"http://127.0.0.1:{sandbox_port}",
        # The launcher runs away from the repository's .env; its packages still resolve.
        PYTHONPATH=str(REPO_ROOT),
    )
    return env


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def processes_with(data_dir: Path) -> list[int]:
    """Pids of every process whose environment names `data_dir` (the launcher's children,
    and Postgres, started by it, inherit DATA_DIR)."""
    needle = f"DATA_DIR={data_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


async def test_dev_launcher_refuses_a_second_stack_and_stops_when_the_terminal_closes() -> None:
    """Item 8: a second `make dev` on the same data dir exits at once with one line naming
    the directory and the running launcher's pid, and leaves the first alone; closing the
    first one's terminal (SIGHUP) stops every process in order and frees every port."""
    base = Path(tempfile.mkdtemp(prefix="orderflow-launcher-"))
    # As root, Postgres runs as an unprivileged user that must reach its data directory.
    os.chmod(base, 0o755)
    data_dir = base / "data"
    workdir = base / "cwd"
    workdir.mkdir()
    ports = {name: free_port() for name in ("api", "sandbox", "temporal", "ui")}
    cmd = [sys.executable, "-m", "workers.dev"]

    # The terminal: setsid --ctty makes the pty the launcher's controlling terminal, so
    # closing its master side hangs the launcher up as closing a window would.
    master, slave = pty.openpty()
    first = await asyncio.create_subprocess_exec(
        "setsid",
        "--ctty",
        *cmd,
        "--temporal-port",
        str(ports["temporal"]),
        "--ui-port",
        str(ports["ui"]),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=workdir,
        env=launcher_env(data_dir, ports["api"], ports["sandbox"]),
    )
    os.close(slave)
    screen = bytearray()
    loop = asyncio.get_running_loop()

    def read_screen() -> None:
        try:
            screen.extend(os.read(master, 65536))
        except OSError:  # EIO: the launcher has closed its side
            loop.remove_reader(master)

    loop.add_reader(master, read_screen)
    terminal_open = True
    try:
        deadline = time.monotonic() + 120
        while BANNER.encode() not in screen:
            assert first.returncode is None, screen.decode(errors="replace")[-4000:]
            assert time.monotonic() < deadline, screen.decode(errors="replace")[-4000:]
            await asyncio.sleep(0.2)
        api = f"http://127.0.0.1:{ports['api']}"

        # The second launcher: same data dir, ports of its own, so only the lock can stop it.
        started = time.monotonic()
        second = await asyncio.create_subprocess_exec(
            *cmd,
            "--temporal-port",
            str(free_port()),
            "--ui-port",
            str(free_port()),
            cwd=workdir,
            env=launcher_env(data_dir, free_port(), free_port()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 1
        assert time.monotonic() - started < 15
        lines = (out + err).decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert str(data_dir) in lines[0] and f"pid {first.pid}" in lines[0], lines[0]
        assert first.returncode is None
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{api}/healthz")).status_code == 200

        stack_pids = processes_with(data_dir)
        assert first.pid in stack_pids and len(stack_pids) > 4, stack_pids

        # Close the terminal.
        loop.remove_reader(master)
        os.close(master)
        terminal_open = False
        assert await asyncio.wait_for(first.wait(), 90) == 0

        assert processes_with(data_dir) == []
        assert not [name for name, port in ports.items() if port_open(port)]
        assert not (data_dir / "postgres" / "postmaster.pid").exists()
        # The lock went with the launcher: the next `make dev` may start.
        with (data_dir / "launcher.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        if terminal_open:
            loop.remove_reader(master)
            os.close(master)
        if first.returncode is None:
            first.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(first.wait(), 60)
            except TimeoutError:
                first.kill()
                await first.wait()
        await asyncio.to_thread(stop_embedded_postgres, data_dir / "postgres")
        shutil.rmtree(base, ignore_errors=True)
