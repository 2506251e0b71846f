"""Starting and stopping a real `infer-recipes serve` process on a free loopback port, for the serving tests."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], timeout: float = 180.0, port: int | None = None):
    """(process, base url) of a server that answers /health; `output(process)` is what it printed so far (a file,
    not a pipe: a server that logs a lot never blocks on a pipe nobody reads)."""
    port = port or free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "infer_recipes", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output(proc)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout} s:\n{output(proc)}")


def output(proc) -> str:
    with open(proc.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def stop(proc) -> str:
    """Stops the server (SIGTERM, then kill) and returns what it printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return output(proc)


def metric(url: str, name: str, model: str) -> float:
    m = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', httpx.get(f"{url}/metrics").text, re.M)
    assert m, f"{name} for {model} not in /metrics"
    return float(m.group(1))


def wait_pool_full(url: str, model: str, seconds: float = 30) -> None:
    total = metric(url, "infer_recipes_kv_cache_total_blocks", model)
    deadline = time.monotonic() + seconds
    while metric(url, "infer_recipes_kv_cache_free_blocks", model) < total:
        assert time.monotonic() < deadline, f"{model}'s KV pool did not return to full"
        time.sleep(0.1)
    assert metric(url, "infer_recipes_num_requests_running", model) == 0
