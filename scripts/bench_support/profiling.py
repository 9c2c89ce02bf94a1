"""Where a gateway worker's time goes: py-spy samples it under load, summarised by function.

py-spy attaches from outside (ptrace; root here) and pauses the worker for each sample: its
``--nonblocking`` mode lost over a third of the samples here (stacks read while they changed),
which biases against short functions, while pausing costs the worker about 2% of its rate.
Idle samples (the event loop waiting in epoll) are left out, so shares are of busy time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE_HZ = 250
EVENT_LOOP_NATIVE = "[event loop, native: uvloop polling, socket I/O, dispatch]"
NO_PYTHON_FRAME = "[native code, no Python frame]"
_LOOP_FRAMES = frozenset(
    {"Runner.run (asyncio/runners.py)", "run_until_complete (asyncio/base_events.py)"}
)
#: Entry frames of every worker: 100% by definition, so they say nothing.
_ENTRY_FILES = ("(gateway/cli.py)", "(gateway/__main__.py)")
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_SITE = re.compile(r".*/(?:site|dist)-packages/")
_STDLIB = re.compile(r".*/lib/python3\.\d+/")


def find_py_spy() -> str | None:
    beside_python = Path(sys.executable).with_name("py-spy")
    return str(beside_python) if beside_python.exists() else shutil.which("py-spy")


def start(py_spy: str, pid: int, duration_s: float, output: Path) -> subprocess.Popen[bytes]:
    argv = [
        py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))),
        "--rate", str(SAMPLE_RATE_HZ), "--function", "--format", "raw",
        "--subprocesses", "--output", str(output),
    ]  # fmt: skip
    log = output.with_suffix(".log").open("wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def _short(frame: str, repo: Path) -> str:
    """``handler (/long/path/site-packages/aiohttp/web_protocol.py:1)`` -> ``handler
    (aiohttp/web_protocol.py)``: the function and where it lives, not the sample's line."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    file = match["file"].replace(f"{repo}/", "")
    file = _STDLIB.sub("", _SITE.sub("", file))
    return f"{match['name']} ({file})"


@dataclass(frozen=True)
class Profile:
    samples: int
    #: Samples py-spy could not take (its own count), when its log says.
    errors: int | None
    #: Function -> samples in which it was running itself (the innermost frame).
    self_time: Counter[str]
    #: Function -> samples in which it was anywhere on the stack.
    total_time: Counter[str]


def _errors(log: Path) -> int | None:
    try:
        match = re.search(r"Errors: (\d+)", log.read_text(errors="replace"))
    except OSError:
        return None
    return int(match[1]) if match else None


def summarize(raw_file: Path, repo: Path) -> Profile:
    """Read py-spy's raw (collapsed stacks) output: ``frame;frame;...;frame count`` lines."""
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    samples = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # --subprocesses puts a "process N:..." frame first; it is not code.
        frames = [_short(f, repo) for f in stack.split(";") if not f.startswith("process ")]
        frames = [f for f in frames if f] or [NO_PYTHON_FRAME]
        if frames[-1] in _LOOP_FRAMES:
            # Busy inside uvloop's C code (epoll, socket reads and writes, callback dispatch)
            # with no Python frame of its own above the loop's entry point.
            frames.append(EVENT_LOOP_NATIVE)
        samples += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            total_time[frame] += count
    return Profile(samples, _errors(raw_file.with_suffix(".log")), self_time, total_time)


def gateway_totals(profile: Profile) -> list[tuple[str, int]]:
    """The gateway's own functions by total time, without the worker's entry frames."""
    rows = [
        (name, count)
        for name, count in profile.total_time.items()
        if "(gateway/" in name and not name.endswith(_ENTRY_FILES)
    ]
    return sorted(rows, key=lambda row: -row[1])
