"""Several worker processes on one port: a supervisor that starts, signals and replaces them.

Each worker is a fresh interpreter running ``serve`` with ``SO_REUSEPORT``, so the kernel
spreads connections over every core and each worker has its own event loop and live-state
snapshot (shared through Redis when configured). Fresh interpreters rather than forks because
prometheus_client must see ``PROMETHEUS_MULTIPROC_DIR`` before it is first imported.
The supervisor only forwards signals and replaces workers that die; it serves nothing.
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

from gateway.metrics import prepare_multiprocess_dir, worker_exited

log = logging.getLogger("gateway.workers")

MULTIPROC_ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: A worker flag the supervisor adds: bind with SO_REUSEPORT, use shared-file metrics.
WORKER_FLAG = "--as-worker"
#: How long workers get to finish in-flight requests after SIGTERM before they are killed.
STOP_GRACE_S = 30.0
#: Pause before replacing a worker that died, so a crash loop does not spin.
RESPAWN_DELAY_S = 1.0
_POLL_S = 0.2


class Supervisor:
    def __init__(self, worker_argv: Sequence[str], workers: int) -> None:
        self._argv = [sys.executable, "-m", "gateway", *worker_argv, WORKER_FLAG]
        self._count = workers
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._pending: list[int] = []

    def _spawn(self, env: dict[str, str]) -> None:
        child = subprocess.Popen(self._argv, env=env)
        self._children[child.pid] = child
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
            while self._children:
                self._handle_signals()
                self._reap(env)
                time.sleep(_POLL_S)
        finally:
            self._stop_children()
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0

    def _handle_signals(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            if signum == signal.SIGHUP:
                log.info("reloading the config in every worker")
                self._signal_all(signal.SIGHUP)
            elif not self._stopping:
                log.info("stopping %d workers", len(self._children))
                self._stopping = True
                self._signal_all(signal.SIGTERM)

    def _reap(self, env: dict[str, str]) -> None:
        for pid, child in list(self._children.items()):
            code = child.poll()
            if code is None:
                continue
            del self._children[pid]
            worker_exited(pid)
            if self._stopping:
                continue
            log.error("worker %d exited with %d; starting a new one", pid, code)
            time.sleep(RESPAWN_DELAY_S)
            self._spawn(env)

    def _stop_children(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self._children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %g s; killing it", child.pid, STOP_GRACE_S)
                child.kill()
                child.wait()
