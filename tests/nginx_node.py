"""The shipped nginx site (config/nginx/node.conf) run by the real Debian nginx, unprivileged.

``NginxNode`` writes a minimal nginx.conf into a temporary prefix (pid, logs and temp paths
there too), includes the site with only its ``listen`` and ``root`` lines replaced (127.0.0.1
and a free port, the test's node directory), starts ``nginx -g 'daemon off;'`` and waits for
``/health``. Its access log records method, URI, status and User-Agent per request, so a test
can tell which files clients fetched. Run as root (a container), the workers stay root: the
default ``nobody`` could not read pytest's private temporary directories.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from fake_hub import OTHER_HOST
from processes import REPO, free_port, wait_until

SITE = REPO / "config" / "nginx" / "node.conf"
_LISTEN = "    listen 80;\n"
_ROOT = "    root /srv/mirror-node;\n"


def nginx_binary() -> str:
    # Debian puts it in /usr/sbin, which a non-root PATH often lacks.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed: run scripts/test once (it installs nginx)")
    return found


@dataclass(frozen=True)
class Hit:
    method: str
    uri: str
    status: int
    user_agent: str


class NginxNode:
    def __init__(self, root: Path, prefix: Path) -> None:
        self.port = free_port()
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        site = SITE.read_text()
        for line in (_LISTEN, _ROOT):
            assert site.count(line) == 1, f"{SITE} must hold exactly one {line.strip()!r}"
        site = site.replace(_LISTEN, f"    listen 127.0.0.1:{self.port};\n")
        site = site.replace(_ROOT, f"    root {root};\n")
        (prefix / "node.conf").write_text(site)
        self.access_log = prefix / "access.log"
        self.error_log = prefix / "error.log"
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = "".join(
            f"    {kind}_temp_path {prefix / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {prefix / 'nginx.pid'};\n"
            f"error_log {self.error_log} warn;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            "    log_format hits '$request_method\\t$request_uri\\t$status\\t$http_user_agent';\n"
            f"    access_log {self.access_log} hits;\n{temp}"
            f"    include {prefix / 'node.conf'};\n"
            "}\n"
        )
        self._output = (prefix / "stderr.log").open("wb")
        self.process = subprocess.Popen(
            [nginx_binary(), "-p", str(prefix), "-e", str(self.error_log),
             "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            stdout=self._output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(self._healthy, 20, "nginx to answer /health")
        except AssertionError:
            self.stop()
            raise AssertionError(f"nginx did not start:\n{self.logs()}") from None

    @property
    def url(self) -> str:
        """On host ``localhost``, like every node in these tests (see fake_hub.OTHER_HOST)."""
        return f"http://{OTHER_HOST}:{self.port}"

    def logs(self) -> str:
        parts = [p.read_text() for p in (self.prefix / "stderr.log", self.error_log) if p.exists()]
        return "\n".join(parts)

    def _healthy(self) -> bool:
        assert self.process.poll() is None, self.logs()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def hits(self) -> list[Hit]:
        if not self.access_log.exists():
            return []
        hits = []
        for line in self.access_log.read_text().splitlines():
            method, uri, status, agent = line.split("\t")
            hits.append(Hit(method, uri, int(status), agent))
        return hits

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._output.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
