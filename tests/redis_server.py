"""A real ``redis-server`` on loopback for tests, which can be stopped, killed and restarted.

Tests never fake Redis: outages are made by stopping or pausing this process. Use the
``redis_server`` / ``redis_url`` / ``private_redis`` fixtures from ``conftest.py``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

MISSING = (
    "redis-server is not installed (or not on PATH); the store tests drive a real one. "
    "Install it with `apt-get install redis-server`, or run scripts/test, which installs it."
)
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            # NOAUTH: a server with requirepass is up as well.
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _started(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether the process answers PING within ``START_TIMEOUT_S`` (False: it died or hung)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers_ping(port):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``, without persistence.

    ``args``: more command-line settings (``--requirepass``, ``--replicaof``...).
    """

    def __init__(self, port: int, directory: Path, args: Sequence[str] = ()) -> None:
        self.port = port
        self.dir = directory
        self.log = directory / "redis-server.log"
        self.args = tuple(args)
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._process is not None, "redis-server is not running"
        return self._process.pid

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        assert self._process is None, "redis-server is already running"
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(MISSING, pytrace=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir), *self.args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if not _started(self._process, self.port):
            self.kill()
            raise AssertionError(
                f"redis-server did not start on port {self.port}:\n{self.log.read_text()}"
            )

    def stop(self) -> None:
        """SIGTERM, as an orderly shutdown; waits for the process to exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as a crash; waits for the process to exit."""
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, like an overloaded server."""
        assert self._process is not None, "redis-server is not running"
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._process is not None, "redis-server is not running"
        self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def flushall(self) -> None:
        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            client.flushall()

    def _end(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        self._process.send_signal(sig)
        if self._paused:
            # A stopped process only acts on SIGTERM once it runs again.
            self.resume()
        self._process.wait(timeout=10)
        self._process = None


class RedisSentinel:
    """One ``redis-sentinel`` process on ``127.0.0.1:port`` watching one primary.

    Short timeouts, so that a test's failover takes seconds: the primary is taken as down after
    ``down_after_ms`` without an answer, and a failed failover is retried soon. ``settings``:
    more sentinel.conf lines (TLS...).
    """

    def __init__(
        self,
        port: int,
        directory: Path,
        *,
        master_name: str,
        primary_port: int,
        quorum: int,
        auth_pass: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        settings: Sequence[str] = (),
    ) -> None:
        self.port = port
        self.dir = directory
        self.log = directory / "redis-sentinel.log"
        self.conf = directory / "sentinel.conf"
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {directory}",
            f"sentinel monitor {master_name} 127.0.0.1 {primary_port} {quorum}",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
            f"sentinel parallel-syncs {master_name} 1",
        ]
        if auth_pass is not None:
            lines.append(f"sentinel auth-pass {master_name} {auth_pass}")
        self._settings = [*lines, *settings]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            pytest.fail(
                "redis-sentinel is not installed; `apt-get install redis-sentinel`, or run "
                "scripts/test, which installs it",
                pytrace=False,
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        # Sentinel rewrites its config file as it learns the topology: a fresh one per start.
        self.conf.write_text("\n".join(self._settings) + "\n")
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        if not _started(self._process, self.port):
            self.stop()
            raise AssertionError(
                f"redis-sentinel did not start on port {self.port}:\n{self.log.read_text()}"
            )

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        self._process.wait(timeout=10)
        self._process = None
