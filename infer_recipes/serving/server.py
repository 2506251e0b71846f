"""Running the app under uvicorn: the port taken before the models load, models loaded before it answers, and a
drain on SIGTERM / SIGINT that keeps answering (503) while the requests in flight finish."""
from __future__ import annotations

import socket
import sys
import threading
import time

import uvicorn

from ..errors import InferRecipesError
from .app import create_app
from .pool import ModelPool
from .routing import Cascade

# How long an idle keep-alive connection stays open. It must outlast the idle expiry of the clients that pool
# connections (httpx and so the `openai` SDK: 5 s; uvicorn's own default is also 5 s): then the client always drops
# an idle connection first, and a request never goes out on a socket the server is closing at that instant (that
# race answers "Server disconnected without sending a response", and a POST is not retried). nginx keeps 75 s.
KEEP_ALIVE_S = 75


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken first: a port in use is a one-line error before any model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InferRecipesError(f"cannot listen on {host}:{port} ({e.strerror}): the port is in use or the "
                                f"address is not this machine's; choose another with --port / --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT starts a drain: the port stays open and new requests get 503 (`shutting_down`)
    while those in flight finish (at most `drain_timeout` s); then uvicorn stops. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app, drain_timeout: float):
        super().__init__(config)
        self._app, self._drain_timeout = app, drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if self._app.state.draining:
            super().handle_exit(sig, frame)
            return
        self._app.state.draining = True
        print(f"draining: {self._app.state.in_flight} requests in flight; new ones get 503", file=sys.stderr,
              flush=True)

        def drain():
            deadline = time.monotonic() + self._drain_timeout
            while self._app.state.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            super(_DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain, name="drain", daemon=True).start()


def serve(pool: ModelPool, host: str = "127.0.0.1", port: int = 8000, cascades: dict[str, Cascade] | None = None,
          api_key: str | None = None, log_level: str = "info", drain_timeout: float = 120.0) -> None:
    sock = bind(host, port)
    try:
        app = create_app(pool, cascades, api_key)
        pool.preload()
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                timeout_keep_alive=KEEP_ALIVE_S,
                                access_log=log_level == "debug")
        _DrainingServer(config, app, drain_timeout).run(sockets=[sock])
    finally:
        sock.close()
        pool.shutdown()
