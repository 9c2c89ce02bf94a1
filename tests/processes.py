"""Run the gateway as operators do: ``python -m gateway serve`` in its own process, on loopback."""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes; return status, lower-cased headers and body."""
    return http_in_pieces(port, [request], 0.0, timeout)


def http_in_pieces(
    port: int, pieces: list[bytes], pause_s: float, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """As ``http``, the request sent in ``pieces`` with a pause after each but the last."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for i, piece in enumerate(pieces):
            sock.sendall(piece)
            if i < len(pieces) - 1:
                time.sleep(pause_s)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    return int(lines[0].split()[1]), headers, body


def request(method: str, target: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class GatewayProcess:
    def __init__(
        self,
        config: Path | dict[str, Any],
        tmp_path: Path,
        *,
        env: dict[str, str] | None = None,
        workers: int = 1,
        drain_s: float = 0.0,
        log_level: str = "INFO",
        open_files: int | None = None,
    ) -> None:
        """``open_files``: the gateway's open-file limit (soft and hard), as ``ulimit -n``."""
        self.port = free_port()
        if isinstance(config, dict):
            # Tests stop gateways all the time: no drain window unless a test asks for one.
            config = {**config, "server": {**(config.get("server") or {}), "drain_s": drain_s}}
            path = tmp_path / f"gateway-{self.port}.yaml"
            path.write_text(yaml.safe_dump(config))
            config = path
        self.config_path = config
        self.log = tmp_path / f"gateway-{self.port}.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
             "--log-level", log_level],
            stdout=self._log_file, stderr=subprocess.STDOUT, cwd=REPO,
            env={**_base_env(), **(env or {})},
            # Only setrlimit runs between fork and exec: no lock another thread could hold.
            preexec_fn=None if open_files is None else partial(_limit_open_files, open_files),  # noqa: PLW1509
        )  # fmt: skip
        try:
            wait_until(self._healthy, 30, "the gateway to start")
        except AssertionError:
            self.stop()
            raise AssertionError(f"gateway did not start:\n{self.log.read_text()}") from None

    def _healthy(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def get(
        self, target: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        return http(self.port, request(method, target, headers))

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=15)
        finally:
            self._log_file.close()
        return code

    def wait_for_log(self, text: str, timeout: float = 10) -> None:
        try:
            wait_until(lambda: text in self.log.read_text(), timeout, f"log line {text!r}")
        except AssertionError:
            raise AssertionError(f"{text!r} not logged:\n{self.log.read_text()}") from None


def worker_pids(gateway: GatewayProcess) -> set[int]:
    """The worker processes of a multi-worker gateway (its supervisor's children)."""
    pid = gateway.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(child) for child in children}


def _limit_open_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_GATEWAY_")}
