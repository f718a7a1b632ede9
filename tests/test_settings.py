"""Settings: no sandbox secret in production (item 1) and the models on sale (item 5).

Every Settings here is built with _env_file=None, and conftest clears the settings' variables
from the environment, so neither a developer's .env nor their shell can change the outcome.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from api.main import create_app
from sandbox.config import SandboxConfig
from workers.settings import (
    SANDBOX_IDEMPOTENCY_SECRET,
    SANDBOX_STRIPE_KEY,
    SANDBOX_SUPERDUPERAI_TOKEN,
    SANDBOX_WEBHOOK_SECRET,
    Settings,
    describe_errors,
    removed_settings,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# A complete configuration against Stripe's test mode and the real SuperDuperAI.
REAL: dict[str, Any] = {
    "stripe_api_key": "sk_test_51Real0000000000000000000000",
    "stripe_webhook_secret": "whsec_0123456789abcdefghijklmnopqrstuv",
    "superduperai_token": "sdai-real-token-0123456789",
    "idempotency_secret": "i" * 40,
    "admin_token": "a" * 32,
}
# The same, taking real money.
LIVE: dict[str, Any] = {
    **REAL,
    "stripe_api_key": "sk_live_51Real0000000000000000000000",
    "public_url": "https://shop.example.com",
    "superduperai_url": "https://editor.superduperai.co",
}
SANDBOX_URL = "http://127.0.0.1:8100"  # Settings' default
# A real bot next to LIVE's real Stripe.
BOT: dict[str, Any] = {
    **LIVE,
    "telegram_bot_token": "7000000001:AAreal-bot-token-0123456789abcdef",
    "telegram_api_url": "https://api.telegram.org",
    "telegram_webhook_secret": "t" * 40,
}


def build(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def refusal(**values: Any) -> str:
    with pytest.raises(ValidationError) as info:
        build(**values)
    return describe_errors(info.value)


# Each case: the settings, and what the one-line refusal must say (it names the variable).
REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    # A real key of a provider without that provider's secrets.
    "stripe key without webhook secret": (
        {**REAL, "stripe_webhook_secret": None},
        "STRIPE_WEBHOOK_SECRET is required when STRIPE_API_KEY is set",
    ),
    "stripe key that is not a secret key": (
        {**REAL, "stripe_api_key": "pk_live_51Publishable000000"},
        "STRIPE_API_KEY is not a Stripe secret or restricted key",
    ),
    "webhook secret that is not whsec_": (
        {**REAL, "stripe_webhook_secret": "0123456789abcdefghijklmnopqrstuv"},
        "STRIPE_WEBHOOK_SECRET is not a Stripe webhook signing secret",
    ),
    "real key without idempotency secret": (
        {**REAL, "idempotency_secret": None},
        "IDEMPOTENCY_SECRET is required when STRIPE_API_KEY or SUPERDUPERAI_TOKEN is set",
    ),
    "only superduperai real, without idempotency secret": (
        {"superduperai_token": REAL["superduperai_token"]},
        "IDEMPOTENCY_SECRET is required when SUPERDUPERAI_TOKEN is set",
    ),
    "short idempotency secret": (
        {**REAL, "idempotency_secret": "x" * 31},
        "IDEMPOTENCY_SECRET must be at least 32 characters (it has 31)",
    ),
    # A real key mixed with sandbox values.
    "sandbox stripe key": (
        {**REAL, "stripe_api_key": SANDBOX_STRIPE_KEY},
        "STRIPE_API_KEY is the sandbox's public key",
    ),
    "sandbox webhook secret with a real key": (
        {**REAL, "stripe_webhook_secret": SANDBOX_WEBHOOK_SECRET},
        "STRIPE_WEBHOOK_SECRET is the sandbox's public secret",
    ),
    "stripe base at the sandbox": (
        {**REAL, "stripe_api_base": f"{SANDBOX_URL}/stripe"},
        "STRIPE_API_BASE points at the sandbox (SANDBOX_URL) while STRIPE_API_KEY is set",
    ),
    "stripe base at the sandbox, spelled localhost": (
        {**REAL, "stripe_api_base": "http://localhost:8100/stripe/"},
        "STRIPE_API_BASE points at the sandbox",
    ),
    "sandbox superduperai token": (
        {**REAL, "superduperai_token": SANDBOX_SUPERDUPERAI_TOKEN},
        "SUPERDUPERAI_TOKEN is the sandbox's public token",
    ),
    "superduperai url at the sandbox": (
        {**REAL, "superduperai_url": f"{SANDBOX_URL}/superduperai"},
        "SUPERDUPERAI_URL points at the sandbox (SANDBOX_URL) while SUPERDUPERAI_TOKEN is set",
    ),
    "sandbox idempotency secret with a real key": (
        {**REAL, "idempotency_secret": SANDBOX_IDEMPOTENCY_SECRET},
        "IDEMPOTENCY_SECRET is the sandbox's public value",
    ),
    "superduperai url without a token": (
        {"superduperai_url": "https://editor.superduperai.co"},
        "SUPERDUPERAI_URL is set but SUPERDUPERAI_TOKEN is not",
    ),
    "stripe base at stripe.com without a key": (
        {"stripe_api_base": "https://api.stripe.com"},
        "STRIPE_API_BASE points at Stripe but STRIPE_API_KEY is unset",
    ),
    "live payments for sandbox videos": (
        {**LIVE, "superduperai_token": None, "superduperai_url": None},
        "SUPERDUPERAI_TOKEN is required with a live STRIPE_API_KEY",
    ),
    "live key with a local public url": (
        {**LIVE, "public_url": "http://127.0.0.1:8000"},
        "PUBLIC_URL must be the shop's public https address with a live STRIPE_API_KEY",
    ),
    # Admin tokens, sandbox or not.
    "short admin token in the sandbox": (
        {"admin_token": "test-admin-token"},
        "ADMIN_TOKEN must be at least 32 characters (it has 16)",
    ),
    "short admin token in production": (
        {**REAL, "admin_token": "x" * 31},
        "ADMIN_TOKEN must be at least 32 characters (it has 31)",
    ),
    # The models on sale (item 5).
    "no models": ({"video_models": " , "}, "VIDEO_MODELS: list at least one model"),
    "model without vendor": ({"video_models": "veo3=500"}, "VIDEO_MODELS: 'veo3' is not"),
    "model without price": ({"video_models": "google-cloud/veo3"}, "VIDEO_MODELS: "),
    "price in major units": (
        {"video_models": "google-cloud/veo3=5.00"},
        "VIDEO_MODELS: the price of google-cloud/veo3 must be a positive whole number",
    ),
    "zero price": ({"video_models": "a/b=0"}, "VIDEO_MODELS: the price of a/b must be"),
    "negative price": ({"video_models": "a/b=-5"}, "VIDEO_MODELS: the price of a/b must be"),
    "duplicate model": ({"video_models": "a/b=500, a/b=900"}, "VIDEO_MODELS: a/b is listed twice"),
    "orders above what Stripe takes": (
        {"video_models": "a/b=50000000", "max_videos_per_order": 2},
        "allows an order of 100000000 minor units",
    ),
    # Found in review: more mixes of real and sandbox.
    "real videos paid through the sandbox": (
        {"superduperai_token": REAL["superduperai_token"], "idempotency_secret": "s" * 32},
        "SUPERDUPERAI_TOKEN is set while Stripe is sandboxed",
    ),
    "stripe base at the sandbox, spelled 0.0.0.0": (
        {**REAL, "stripe_api_base": "http://0.0.0.0:8100/stripe"},
        "STRIPE_API_BASE points at the sandbox",
    ),
    "order rate of zero": ({"order_rate_limit": "0/minute"}, "ORDER_RATE_LIMIT"),
    "bot token without its webhook secret": (
        {**BOT, "telegram_webhook_secret": None},
        "TELEGRAM_WEBHOOK_SECRET is required",
    ),
    "bot token without a Bot API server": (
        {**BOT, "telegram_api_url": None},
        "TELEGRAM_API_URL is required",
    ),
    "bot token that is the sandbox's": (
        {**BOT, "telegram_bot_token": "1000000001:AAsandbox-bot-token-for-local-use-only"},
        "TELEGRAM_BOT_TOKEN is the sandbox's",
    ),
    "bot pointed at the sandbox": (
        {**BOT, "telegram_api_url": "http://localhost:8100/telegram"},
        "TELEGRAM_API_URL points at the sandbox",
    ),
    "short telegram webhook secret": (
        {**BOT, "telegram_webhook_secret": "short"},
        "TELEGRAM_WEBHOOK_SECRET must be",
    ),
    "real bot with sandboxed Stripe": (
        {
            "telegram_bot_token": BOT["telegram_bot_token"],
            "telegram_api_url": BOT["telegram_api_url"],
            "telegram_webhook_secret": BOT["telegram_webhook_secret"],
            "idempotency_secret": "i" * 40,
            "public_url": "https://shop.example.com",
        },
        "TELEGRAM_BOT_TOKEN is set while Stripe is sandboxed",
    ),
    "real bot on a local public url": (
        {**BOT, "public_url": "http://127.0.0.1:8000"},
        "PUBLIC_URL must be the shop's public https address with TELEGRAM_BOT_TOKEN",
    ),
    "real Bot API server without a token": (
        {"telegram_api_url": "https://api.telegram.org"},
        "TELEGRAM_API_URL is set but TELEGRAM_BOT_TOKEN is not",
    ),
    "supabase url without its key": (
        {"supabase_url": "https://x.supabase.co"},
        "SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY go together",
    ),
    "supabase with the sandbox's key": (
        {
            "supabase_url": "https://x.supabase.co",
            "supabase_service_role_key": "sandbox-service-role-key",
        },
        "SUPABASE_SERVICE_ROLE_KEY is the sandbox's public key",
    ),
    "gemini with the sandbox's key": (
        {"gemini_api_key": "sandbox-gemini-key"},
        "GEMINI_API_KEY is the sandbox's public key",
    ),
    "a gemini model that cannot call tools with a JSON answer": (
        {"gemini_model": "gemini-2.5-flash"},
        "GEMINI_MODEL='gemini-2.5-flash' cannot call tools with a JSON answer",
    ),
    "gemini url without a key": (
        {"gemini_api_url": "https://gemini-proxy.example.com"},
        "GEMINI_API_URL is set but GEMINI_API_KEY is not",
    ),
    "a real gemini key sent to the sandbox": (
        {"gemini_api_key": "AIza-real-key", "gemini_api_url": "http://localhost:8100/gemini"},
        "GEMINI_API_URL points at the sandbox",
    ),
}


def test_a_real_bot_with_real_stripe_is_accepted() -> None:
    settings = build(**BOT)
    assert settings.production and not settings.telegram_sandboxed
    assert settings.telegram_base == "https://api.telegram.org"
    assert settings.telegram_secret == BOT["telegram_webhook_secret"]


@pytest.mark.parametrize(("values", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_unsafe_settings_are_refused_naming_the_variable(
    values: dict[str, Any], message: str
) -> None:
    """Items 1 and 5: each unsafe configuration is refused in words that name what to fix."""
    reason = refusal(**values)
    assert message in reason
    assert "\n" not in reason


def test_every_problem_is_named_in_one_line() -> None:
    """Item 1: a deployer fixes everything in one go, not one restart per variable."""
    reason = refusal(stripe_api_key="sk_test_abc", admin_token="short")
    assert "\n" not in reason
    for name in ("ADMIN_TOKEN", "STRIPE_WEBHOOK_SECRET", "IDEMPOTENCY_SECRET"):
        assert name in reason


def test_sandbox_mode_needs_no_settings() -> None:
    """Item 1: with no keys every provider is sandboxed and the public sandbox values apply."""
    settings = build()
    assert not settings.production
    assert settings.stripe_key == SANDBOX_STRIPE_KEY
    assert settings.webhook_secret == SANDBOX_WEBHOOK_SECRET
    assert settings.superduperai_key == SANDBOX_SUPERDUPERAI_TOKEN
    assert settings.stripe_base == f"{SANDBOX_URL}/stripe"
    assert settings.superduperai_base == f"{SANDBOX_URL}/superduperai"
    assert settings.idempotency_key_secret == SANDBOX_IDEMPOTENCY_SECRET
    assert settings.admin_token is None


def test_blank_values_mean_unset() -> None:
    """Item 1: `STRIPE_API_KEY=` (as compose files write it) is the sandbox, not a bad key."""
    settings = build(stripe_api_key="", superduperai_token=" ", admin_token="")
    assert settings.stripe_sandboxed and settings.superduperai_sandboxed
    assert settings.admin_token is None


@pytest.mark.parametrize("config", [REAL, LIVE], ids=["test-mode", "live"])
def test_real_configuration_uses_only_real_values(config: dict[str, Any]) -> None:
    """Item 1: a fully real configuration starts, and no sandbox value stands in anywhere."""
    settings = build(**config)
    assert settings.production
    assert settings.stripe_key == config["stripe_api_key"]
    assert settings.webhook_secret == config["stripe_webhook_secret"]
    assert settings.superduperai_key == config["superduperai_token"]
    assert settings.idempotency_key_secret == config["idempotency_secret"]
    assert settings.stripe_base == "https://api.stripe.com"
    assert settings.superduperai_base == "https://editor.superduperai.co"


def test_sandbox_defaults_apply_only_to_the_sandboxed_provider() -> None:
    """Item 1: real Stripe (test mode) next to a sandboxed SuperDuperAI is allowed."""
    settings = build(**{**REAL, "superduperai_token": None})
    assert settings.stripe_key == REAL["stripe_api_key"]
    assert settings.webhook_secret == REAL["stripe_webhook_secret"]
    assert settings.stripe_base == "https://api.stripe.com"
    assert settings.superduperai_key == SANDBOX_SUPERDUPERAI_TOKEN
    assert settings.superduperai_base == f"{SANDBOX_URL}/superduperai"
    assert settings.idempotency_key_secret == REAL["idempotency_secret"]


def test_a_copy_made_real_never_falls_back_to_sandbox_secrets() -> None:
    """Item 1: model_copy skips validation, so the properties themselves refuse."""
    settings = build().model_copy(update={"stripe_api_key": REAL["stripe_api_key"]})
    with pytest.raises(RuntimeError, match="STRIPE_WEBHOOK_SECRET"):
        _ = settings.webhook_secret
    with pytest.raises(RuntimeError, match="IDEMPOTENCY_SECRET"):
        _ = settings.idempotency_key_secret


def test_the_sandbox_never_holds_a_real_providers_secrets() -> None:
    """Item 1: a sandbox started next to real providers (make dev) cannot sign a webhook the
    API would trust, nor accept the real keys."""
    config = SandboxConfig.from_settings(build(**LIVE))
    held = {config.webhook_secret, config.stripe_api_key, config.superduperai_token}
    assert held == {SANDBOX_WEBHOOK_SECRET, SANDBOX_STRIPE_KEY, SANDBOX_SUPERDUPERAI_TOKEN}


def test_video_models_keep_their_order_and_prices() -> None:
    """Item 5: the first model listed is the default; prices are minor units."""
    assert build().video_model_prices == {
        "google-cloud/veo3-fast": 500,
        "google-cloud/veo3": 1500,
    }
    settings = build(video_models=" acme/slow=900 ,acme/fast=250,")
    assert list(settings.video_model_prices.items()) == [("acme/slow", 900), ("acme/fast", 250)]
    assert settings.default_video_model == "acme/slow"
    assert settings.default_video_price == 900


def _refused_to_listen(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENTRY_POINTS = {
    "api": ["workers.api"],
    "worker": ["workers.worker"],
    "sandbox": ["sandbox"],
    "dev": ["workers.dev"],
    "migrate": ["workers.stack", "migrate"],
}


@pytest.mark.parametrize(
    ("via", "entry_points"),
    # Every entry point from the environment; one is enough to show a .env counts the same.
    [("environment", list(ENTRY_POINTS)), ("dotenv", ["api"])],
    ids=["environment", "dotenv"],
)
def test_every_process_refuses_to_start_with_one_line(
    tmp_path: Path, via: str, entry_points: list[str]
) -> None:
    """Item 1: each real entry point, given a real key without its webhook secret, exits 2
    with exactly one line on stderr and listens on nothing."""
    api_port, sandbox_port = _free_port(), _free_port()
    bad = {
        "STRIPE_API_KEY": REAL["stripe_api_key"],
        "IDEMPOTENCY_SECRET": REAL["idempotency_secret"],
        "API_PORT": str(api_port),
        "SANDBOX_PORT": str(sandbox_port),
        "SANDBOX_URL": f"http://127.0.0.1:{sandbox_port}",
        "DATA_DIR": str(tmp_path / "data"),
    }
    # A clean environment, as `env -i` gives: nothing of this shell's settings gets in.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)}
    if via == "dotenv":
        (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in bad.items()))
    else:
        env.update(bad)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=tmp_path,  # the only .env a process can find is the one this test wrote
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in ENTRY_POINTS.items()
        if name in entry_points
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (name, out, err)
        assert out == "", (name, out)
        lines = err.splitlines()
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("orderflow: refusing to start: "), (name, err)
        assert "STRIPE_WEBHOOK_SECRET is required when STRIPE_API_KEY is set" in lines[0]
    assert _refused_to_listen(api_port) and _refused_to_listen(sandbox_port)
    assert not (tmp_path / "data").exists()  # nothing started, not even the dev stack's dirs


def test_removed_settings_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Item 5: a deployment still setting VIDEO_PRICE would otherwise start and charge the
    VIDEO_MODELS price without a word."""
    env_file = tmp_path / ".env"
    env_file.write_text("VIDEO_GENERATION_CONFIG=google-cloud/veo3\n")
    monkeypatch.setenv("VIDEO_PRICE", "2000")
    problems = removed_settings(str(env_file))
    assert problems == [
        "VIDEO_PRICE no longer exists: use VIDEO_MODELS (each model with its price)",
        "VIDEO_GENERATION_CONFIG no longer exists: use VIDEO_MODELS (the first model is the "
        "default)",
    ]
    monkeypatch.delenv("VIDEO_PRICE")
    assert removed_settings(str(tmp_path / "absent.env")) == []


async def test_production_without_a_bot_turns_the_shop_off() -> None:
    """With real providers and no bot token, the sandbox's public bot token signs nothing:
    the shop's routes answer 503 and no process holds a bot."""
    settings = build(**REAL)
    assert not settings.shop_enabled
    with pytest.raises(RuntimeError):
        _ = settings.telegram_token
    app = create_app(settings)
    assert app.state.bot is None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        for method, path in (
            ("GET", "/api/shop/products"),
            ("POST", "/webhooks/telegram"),
        ):
            resp = await http.request(method, path, headers={"Authorization": "tma x"}, json={})
            assert resp.status_code == 503, (path, resp.text)
            assert resp.json()["error"] == "shop_disabled"
    assert build().shop_enabled and build(**BOT).shop_enabled


def test_the_assistant_runs_on_a_real_key_or_wholly_in_the_sandbox() -> None:
    """A real bot never hands its customers to the sandbox's scripted model: without a Gemini
    key it answers text with the shop's button; with one, Gemini's own endpoint is used."""
    sandbox = build()
    assert sandbox.assistant_enabled and sandbox.gemini_base == f"{SANDBOX_URL}/gemini"
    assert sandbox.embedding_model == "multilingual-e5-small"
    assert not build(**BOT).assistant_enabled
    real = build(**BOT, gemini_api_key="AIza-real-key")
    assert real.assistant_enabled and real.gemini_key == "AIza-real-key"
    assert real.gemini_base == "https://generativelanguage.googleapis.com"
    assert real.embedding_model == "gemini-embedding-001"
    assert build(operator_chat_id="").operator_chat_id is None
