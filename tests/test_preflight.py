"""Start-up failures end with one line and exit 2; workers that keep dying end the supervisor.

Every test runs ``python -m gateway`` as operators do, against real files and real sockets.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from geoworld import GeoDBs
from processes import REPO, GatewayProcess, free_port, wait_until, worker_pids

from gateway.workers import RestartPolicy, restart_delay


def config(geo: GeoDBs, **geoip: str) -> dict[str, Any]:
    return {
        "upstream": {"url": "http://127.0.0.1:9"},
        "geoip": {"city_db": str(geo.city), "asn_db": str(geo.asn), **geoip},
        "probing": {"enabled": False},
    }


def run_gateway(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("MIRROR_GATEWAY_")},
    )  # fmt: skip


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on (without SO_REUSEPORT, as most servers do)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def write(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_refuses_a_taken_port(
    geo_dbs: GeoDBs, tmp_path: Path, taken_port: int, workers: int
) -> None:
    result = run_gateway(
        "serve", "--config", write(tmp_path, config(geo_dbs)), "--host", "127.0.0.1",
        "--port", str(taken_port), "--workers", str(workers), timeout=30,
    )  # fmt: skip
    assert_one_line_refusal(result, "server.port", f"127.0.0.1:{taken_port}", "in use")


def test_serve_refuses_an_address_that_is_not_ours(geo_dbs: GeoDBs, tmp_path: Path) -> None:
    result = run_gateway(
        "serve", "--config", write(tmp_path, config(geo_dbs)), "--host", "192.0.2.1",
        "--port", str(free_port()), "--workers", "2", timeout=30,
    )  # fmt: skip
    assert_one_line_refusal(result, "server.host", "192.0.2.1", "cannot assign")


def test_serve_refuses_a_taken_metrics_port(
    geo_dbs: GeoDBs, tmp_path: Path, taken_port: int
) -> None:
    data = {**config(geo_dbs), "metrics": {"port": taken_port}}
    result = run_gateway(
        "serve", "--config", write(tmp_path, data), "--host", "127.0.0.1",
        "--port", str(free_port()), "--workers", "2", timeout=30,
    )  # fmt: skip
    assert_one_line_refusal(result, "metrics.port", str(taken_port))


def test_supervisor_refuses_a_missing_geoip_database(geo_dbs: GeoDBs, tmp_path: Path) -> None:
    data = config(geo_dbs, city_db=str(tmp_path / "absent.mmdb"))
    result = run_gateway(
        "serve", "--config", write(tmp_path, data), "--host", "127.0.0.1",
        "--port", str(free_port()), "--workers", "2", timeout=30,
    )  # fmt: skip
    assert_one_line_refusal(result, "geoip.city_db", "absent.mmdb", "file not found")


def test_check_config_opens_the_geoip_database_serve_would(geo_dbs: GeoDBs, tmp_path: Path) -> None:
    good = run_gateway("check-config", "--config", write(tmp_path, config(geo_dbs)))
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout

    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(b"not a database\n" * 100)
    result = run_gateway(
        "check-config", "--config", write(tmp_path, config(geo_dbs, city_db=str(garbage)))
    )
    assert_one_line_refusal(result, "geoip.city_db", "not a valid MaxMind DB")


def test_check_config_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("server:\n  host: caf\u00e9\n".encode("latin-1"))
    result = run_gateway("check-config", "--config", str(path))
    assert_one_line_refusal(result, "latin1.yaml", "not UTF-8", "0xe9")


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("server:\n  port: 8080\n  host: 127.0.0.1\n  port: 9090\n", "server.port", 4),
        ("upstream: {url: 'https://a.example'}\nupstream: {url: 'https://b.example'}\n",
         "upstream", 2),
        ("nodes:\n  - id: a\n    url: https://a.example\n  - id: b\n    url: https://b.example\n"
         "    url: https://c.example\n", "nodes[1].url", 6),
    ],
)  # fmt: skip
def test_check_config_refuses_duplicate_keys(
    tmp_path: Path, text: str, key: str, line: int
) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    result = run_gateway("check-config", "--config", str(path))
    assert_one_line_refusal(result, f"{key}: duplicate key", f"line {line}")


def test_merge_keys_may_still_override(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "nodes:\n  - &base {id: a, url: 'https://a.example', country: CN}\n"
        "  - <<: *base\n    id: b\n"
    )
    result = run_gateway("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "(2 nodes)" in result.stdout


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (12, 30.0)]
)
def test_restart_delay_doubles_up_to_its_cap(failures: int, delay: float) -> None:
    assert restart_delay(failures, RestartPolicy()) == delay


def test_supervisor_backs_off_then_gives_up_on_workers_that_cannot_start(
    geo_dbs: GeoDBs, tmp_path: Path
) -> None:
    city = tmp_path / "city.mmdb"
    shutil.copy(geo_dbs.city, city)
    gateway = GatewayProcess(config(geo_dbs, city_db=str(city)), tmp_path, workers=2)
    try:
        wait_until(
            lambda: gateway.log.read_text().count("serving on") == 2, 30, "both workers serving"
        )
        # From now on a new worker cannot open its City database and exits at once.
        city.write_bytes(b"corrupt")
        os.kill(max(worker_pids(gateway)), signal.SIGKILL)
        started = time.monotonic()
        code = gateway.process.wait(60)
        elapsed = time.monotonic() - started
    finally:
        gateway.stop()
    log = gateway.log.read_text()
    assert code == 1, log
    assert "giving up: 5 workers in a row exited within 10 s of starting" in log
    # Four replacements, 0.5 + 1 + 2 + 4 s apart at least: not one a second for ever.
    assert log.count("geoip.city_db: cannot open") == 4, log
    assert log.count("starting a new one in") == 4, log
    for delay in ("in 0.5 s", "in 1 s", "in 2 s", "in 4 s"):
        assert delay in log, log
    assert elapsed >= 7.5, elapsed
    assert len(re.findall(r"worker \d+ started", log)) == 2 + 4, log
