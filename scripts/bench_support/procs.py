"""The processes the benchmark starts, and what /proc says about them.

Every server runs in a process group of its own (``start_new_session``), so stopping it reaches
the worker processes it spawned as well, and a Ctrl-C at the terminal reaches only the
benchmark, which then stops them in order. ``Processes`` remembers everything it started and
``stop_all`` ends it: nothing outlives the benchmark.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_S = 15.0
_BAD_LEVELS = frozenset({"warning", "error", "critical"})
_DIGITS = re.compile(r"\d+(?:\.\d+)?")


class BenchError(Exception):
    """Setup failed (a server did not start, a tool is missing); the message says which."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_warnings(self, expected: tuple[str, ...] = ()) -> Counter[str]:
        """Warnings and errors in the server's JSON log lines, counted by message with the
        numbers blanked out (timestamps, ports), leaving out messages containing ``expected``
        text."""
        found: Counter[str] = Counter()
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return found
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or entry.get("level") not in _BAD_LEVELS:
                continue
            message = str(entry.get("msg", ""))
            if not any(text in message for text in expected):
                found[f"{entry['level']}: {_DIGITS.sub('N', message)[:110]}"] += 1
        return found

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with {code}:\n{self.log_tail()}")


class Processes:
    """Starts servers (each in its own process group) and stops every one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._servers: list[Server] = []

    def start(
        self, name: str, argv: Sequence[str], *, port: int, env: dict[str, str] | None = None
    ) -> Server:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        server = Server(name, process, log, port)
        self._servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        """SIGTERM to the server's process group; SIGKILL whatever is left after a grace time."""
        if server in self._servers:
            self._servers.remove(server)
        group = server.pid  # the group leader's pid is the group id (start_new_session)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=STOP_TIMEOUT_S)
        # Workers may outlive their parent by a moment (or forever, if it crashed).
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=5)

    def stop_all(self) -> None:
        # Newest first: the gateway goes before the Redis and upstream it talks to.
        for server in reversed(list(self._servers)):
            self.stop(server)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_http(server: Server, path: str, timeout: float) -> None:
    """Wait until ``path`` answers 200; ``BenchError`` with the log if the server died first."""
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            if http_get(server.port, path, timeout=2.0)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{server.name} did not answer {path} within {timeout:g} s:\n{server.log_tail()}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children(current))
    return sorted(tree)


def workers_of(pid: int) -> tuple[list[int], int | None]:
    """(worker pids, supervisor pid or None): a server that spawned children is their
    supervisor, and they are its workers; one without children is its own only worker."""
    kids = children(pid)
    return (kids, pid) if kids else ([pid], None)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time so far of the given processes (those still alive)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of all cores since boot: busy is everything but idle, iowait
    and steal; stolen is time the hypervisor gave our virtual CPUs to someone else."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def listening_sockets(port: int) -> int:
    """Listening TCP sockets on ``port``: one per worker when workers use SO_REUSEPORT."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    return len(inodes)


# --------------------------------------------------------------------------- Redis


def start_redis(processes: Processes) -> tuple[Server, str]:
    """A private ``redis-server`` on a free loopback port, without persistence; and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    directory = processes.workdir / "redis"
    directory.mkdir(exist_ok=True)
    server = processes.start(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        port=port,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not _answers_ping(port):
        server.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"redis-server did not start:\n{server.log_tail()}")
        time.sleep(0.02)
    return server, f"redis://127.0.0.1:{port}/0"


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False
