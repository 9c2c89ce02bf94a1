"""Several worker processes on one port: a supervisor that starts, signals and replaces them.

Each worker is a fresh interpreter running ``serve`` with ``SO_REUSEPORT``, so the kernel
spreads connections over every core and each worker has its own event loop and live-state
snapshot (shared through Redis when configured). Fresh interpreters rather than forks because
prometheus_client must see ``PROMETHEUS_MULTIPROC_DIR`` before it is first imported.
The supervisor only forwards signals and replaces workers that die; it serves nothing.

Whatever would stop every worker from starting (port taken, GeoIP database unreadable, bad
config) is checked before the first one starts (``gateway.preflight``). Workers that die later
are replaced after a pause that doubles with each worker in a row that died soon after its
start, and after a few of those the supervisor gives up: a crash loop then ends with a reason
instead of spinning unnoticed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.metrics import prepare_multiprocess_dir, worker_exited

log = logging.getLogger("gateway.workers")

MULTIPROC_ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: A worker flag the supervisor adds: bind with SO_REUSEPORT, use shared-file metrics.
WORKER_FLAG = "--as-worker"
#: How long workers get to finish in-flight requests after SIGTERM before they are killed
#: (their drain window comes on top).
STOP_GRACE_S = 30.0
#: The supervisor's exit status when it gave up on workers that keep dying.
EXIT_WORKERS_FAILING = 1
_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    #: Pause before replacing a worker that died after serving a while.
    first_delay_s: float = 0.5
    #: The pause doubles with each rapid failure in a row, up to this.
    max_delay_s: float = 30.0
    #: A worker that dies within this long of its start failed rapidly: it could not start.
    rapid_s: float = 10.0
    #: Give up after this many rapid failures in a row (counted over all workers).
    max_rapid_failures: int = 5


def restart_delay(rapid_failures: int, policy: RestartPolicy) -> float:
    """Pause before the next start after ``rapid_failures`` rapid failures in a row."""
    if rapid_failures <= 1:
        return policy.first_delay_s
    return min(policy.max_delay_s, policy.first_delay_s * 2.0 ** (rapid_failures - 1))


class Supervisor:
    def __init__(
        self,
        worker_argv: Sequence[str],
        workers: int,
        *,
        drain_s: float = 0.0,
        policy: RestartPolicy = RestartPolicy(),
    ) -> None:
        self._argv = [sys.executable, "-m", "gateway", *worker_argv, WORKER_FLAG]
        self._count = workers
        self._stop_grace_s = drain_s + STOP_GRACE_S
        self._policy = policy
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._started_at: dict[int, float] = {}
        self._respawn_at: list[float] = []
        self._rapid_failures = 0
        self._last_failure_at = 0.0
        self._gave_up = False
        self._stopping = False
        self._pending: list[int] = []

    def _spawn(self, env: dict[str, str]) -> None:
        child = subprocess.Popen(self._argv, env=env)
        self._children[child.pid] = child
        self._started_at[child.pid] = time.monotonic()
        log.info("worker %d started", child.pid)

    def _signal_all(self, signum: int) -> None:
        for child in self._children.values():
            if child.poll() is None:
                child.send_signal(signum)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only record it here: the loop below acts, outside the signal handler.
        self._pending.append(signum)

    def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="mirror-gateway-metrics-")
        prepare_multiprocess_dir(metrics_dir)
        os.environ[MULTIPROC_ENV_VAR] = metrics_dir
        env = dict(os.environ)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            for _ in range(self._count):
                self._spawn(env)
            while self._children or self._respawn_at:
                self._handle_signals()
                self._reap()
                self._respawn_due(env)
                time.sleep(_POLL_S)
        finally:
            self._stop_children()
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return EXIT_WORKERS_FAILING if self._gave_up else 0

    def _handle_signals(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            if signum == signal.SIGHUP:
                log.info("reloading the config in every worker")
                self._signal_all(signal.SIGHUP)
            elif not self._stopping:
                log.info("stopping %d workers", len(self._children))
                self._stop()

    def _stop(self) -> None:
        self._stopping = True
        self._respawn_at.clear()
        self._signal_all(signal.SIGTERM)

    def _reap(self) -> None:
        now = time.monotonic()
        for pid, child in list(self._children.items()):
            code = child.poll()
            if code is None:
                continue
            del self._children[pid]
            started = self._started_at.pop(pid)
            worker_exited(pid)
            if self._stopping:
                continue
            self._worker_died(pid, code, now - started, now)
        # A worker started since the last failure that has lived past ``rapid_s`` shows that
        # workers can start again.
        if self._rapid_failures and any(
            started > self._last_failure_at and now - started >= self._policy.rapid_s
            for started in self._started_at.values()
        ):
            self._rapid_failures = 0

    def _worker_died(self, pid: int, code: int, lived_s: float, now: float) -> None:
        policy = self._policy
        rapid = lived_s < policy.rapid_s
        self._rapid_failures = self._rapid_failures + 1 if rapid else 0
        self._last_failure_at = now
        if self._rapid_failures >= policy.max_rapid_failures:
            log.error(
                "giving up: %d workers in a row exited within %g s of starting (the last, "
                "worker %d, with status %d); see their log lines above",
                self._rapid_failures, policy.rapid_s, pid, code,
            )  # fmt: skip
            self._gave_up = True
            self._stop()
            return
        delay = restart_delay(self._rapid_failures, policy)
        log.error("worker %d exited with %d; starting a new one in %g s", pid, code, delay)
        self._respawn_at.append(now + delay)

    def _respawn_due(self, env: dict[str, str]) -> None:
        now = time.monotonic()
        due = [at for at in self._respawn_at if at <= now]
        for at in due:
            self._respawn_at.remove(at)
            self._spawn(env)

    def _stop_children(self) -> None:
        self._signal_all(signal.SIGTERM)
        grace = self._stop_grace_s
        deadline = time.monotonic() + grace
        for child in self._children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %g s; killing it", child.pid, grace)
                child.kill()
                child.wait()
