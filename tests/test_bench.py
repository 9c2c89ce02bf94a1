"""scripts/bench end to end in its quick form: it starts Redis, the local upstream, the gateway
and the baseline, drives them with wrk, reports a ratio, and leaves no process behind.

It needs wrk and redis-server (scripts/test installs both). The figures themselves depend on
the machine, so only their presence and the absence of request errors are checked here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
#: The gateway's warm-up run alone lasts past its first redirect window (about 13 s).
TIMEOUT_S = 120
#: A results row: workers, nodes, the gateway's and the baseline's figures, then the ratio.
_ROW = re.compile(r"^\s+1\s+20 \|.*\|\s+(?P<ratio>\d+)% \|.*\|\s+(?P<errors>\d+) (?P<status>\w+)$")


def _processes_started_under(directory: Path) -> list[int]:
    """Live processes whose TMPDIR lies in ``directory``: everything the bench started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(f"TMPDIR={directory}".encode()) for v in environ):
            found.append(int(entry))
    return found


def test_quick_bench_reports_a_ratio_without_errors(tmp_path: Path) -> None:
    # The bench's work directory, and so every server's TMPDIR, ends up under tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "bench"), "--quick", "--workers", "1",
         "--nodes", "20", "--duration", "2", "--hostile", "2000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the bench then stops everything it started
        output, _ = process.communicate(timeout=30)
        pytest.fail(f"scripts/bench took longer than {TIMEOUT_S} s:\n{output}")

    assert process.returncode == 0, output
    assert "== mirror-gateway benchmark: method" in output
    rows = [match for line in output.splitlines() if (match := _ROW.match(line))]
    assert rows, f"no results row for 1 worker, 20 nodes:\n{output}"
    final = rows[-1]
    assert int(final["ratio"]) > 0, output
    assert (final["errors"], final["status"]) == ("0", "ok"), output
    assert "[PASS] request errors: none in any run" in output
    assert re.search(r"\d+ MiB .* after a load run over all files and clients", output), output
    assert re.search(r"\d+ MiB .* after a hostile pass of 2,000 requests .*1,000x 404", output)
    assert _processes_started_under(tmp_path) == []
