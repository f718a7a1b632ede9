"""`python -m sandbox`: the provider stand-ins, configured from the shared settings."""

from __future__ import annotations

import uvicorn

from sandbox.app import SandboxConfig, create_app
from workers.settings import load_settings


def main() -> None:
    settings = load_settings()
    app = create_app(SandboxConfig.from_settings(settings))
    uvicorn.run(app, host="127.0.0.1", port=settings.sandbox_port)


if __name__ == "__main__":
    main()
