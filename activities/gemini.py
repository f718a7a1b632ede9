"""The google-genai client, pointed at Gemini or at the sandbox's model by base URL only.

The API version is pinned by settings (GEMINI_API_VERSION), so an SDK upgrade cannot move
the calls to another version underneath us. The SDK's own retries are off: each call is one
attempt of a Temporal activity, whose retry policy waits as long as Gemini asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google import genai
from google.genai import types

if TYPE_CHECKING:
    from workers.settings import Settings

# One HTTP call to Gemini, in the SDK's milliseconds; the activity's own timeout is longer.
CALL_TIMEOUT_MS = 60_000


def make_genai_client(settings: Settings) -> genai.Client:
    return genai.Client(
        api_key=settings.gemini_key,
        http_options=types.HttpOptions(
            base_url=settings.gemini_base + "/",
            api_version=settings.gemini_api_version,
            timeout=CALL_TIMEOUT_MS,
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )
