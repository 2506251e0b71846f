"""Running the app under uvicorn: models loaded before the port opens, SIGTERM drains in-flight requests."""
from __future__ import annotations

import uvicorn

from .app import create_app
from .pool import ModelPool
from .routing import Cascade


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: new requests get 503 at once; uvicorn stops listening and waits for the in-flight ones."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame) -> None:
        self._app.state.draining = True
        super().handle_exit(sig, frame)


def serve(pool: ModelPool, host: str = "127.0.0.1", port: int = 8000, cascades: dict[str, Cascade] | None = None,
          api_key: str | None = None, log_level: str = "info", drain_timeout: float = 120.0) -> None:
    app = create_app(pool, cascades, api_key)
    pool.preload()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            access_log=log_level == "debug")
    try:
        _DrainingServer(config, app).run()
    finally:
        pool.shutdown()
