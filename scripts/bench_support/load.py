"""The load: the request mix, the warm-up pass that checks every answer, and the wrk runs."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import resource
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench_support import hub
from bench_support.procs import BenchError

LUA_SCRIPT = Path(__file__).with_name("load.lua")
#: (path, client) pairs in the ring wrk cycles through: every warm path several times over.
RING_SIZE = 20_000
#: wrk counts a request that takes longer as a timeout error (its default is 2 s).
WRK_TIMEOUT_S = 10
RESULT_MARK = "BENCH_RESULT "
#: Longest a warm pass may take: first sight of a client location or a revision is the slow
#: path, and with many nodes it is much slower.
WARM_BUDGET_S = 600.0
#: Headers without which the Hugging Face clients refuse a redirect (see gateway/answers.py).
HF_HEADERS = ("Location", "X-Repo-Commit", "X-Linked-Etag", "X-Linked-Size", "X-Mirror-Node")
#: Hostile pass: ~4 KB missing-file paths (the default ``server.max_path_bytes`` is 4,096).
HOSTILE_PATH_PAD = 3_900
HOSTILE_CONCURRENCY = 16
#: Files per repo the hostile pass's real requests spread over (each repo has at least these).
LOAD_FILES_PER_REPO = 20


def request_mix(paths: Sequence[str], ips: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """Every path equally often, in shuffled rounds, each time from a random client."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < RING_SIZE:
        batch = list(paths)
        rng.shuffle(batch)
        order.extend(batch)
    return [(path, rng.choice(ips)) for path in order[:RING_SIZE]]


def write_lua_data(path: Path, pairs: Sequence[tuple[str, str]]) -> None:
    # JSON strings of plain ASCII are valid Lua strings.
    rows = "\n".join(f"  {{{json.dumps(p)}, {json.dumps(ip)}}}," for p, ip in pairs)
    path.write_text(f"return {{ requests = {{\n{rows}\n}} }}\n")


# --------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    #: connect / read / write / timeout socket errors, and status: non-2xx/3xx answers.
    errors: dict[str, int]
    #: CPU time wrk itself used (it shares the machine with the server).
    wrk_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def describe_errors(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.errors.items() if v) or "none"


def run_wrk(
    url: str, data_file: Path, *, duration_s: float, connections: int, threads: int
) -> WrkResult:
    argv = [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s",
        "--timeout", f"{WRK_TIMEOUT_S}s", "--latency", "-s", str(LUA_SCRIPT), url, str(data_file),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration_s + 60:g} s") from None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = next((x for x in done.stdout.splitlines() if x.startswith(RESULT_MARK)), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = json.loads(line[len(RESULT_MARK) :])
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        mean_ms=data["mean_us"] / 1000,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors={k: data[k] for k in ("connect", "read", "write", "timeout", "status")},
        wrk_cpu_s=wrk_cpu,
    )


def wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    # "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer": name and version.
    return " ".join((done.stdout or done.stderr).split()[:2])


# --------------------------------------------------------------------------- warm-up pass


@dataclass
class WarmReport:
    requests: int = 0
    answers: int = 0
    seconds: float = 0.0
    nodes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def to_upstream(self) -> int:
        return self.nodes["upstream"]

    @property
    def rate(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0


def _problem(path: str, response: aiohttp.ClientResponse) -> str | None:
    if response.status != 302:
        return f"{path}: status {response.status}"
    missing = [h for h in HF_HEADERS if h not in response.headers]
    if missing:
        return f"{path}: no {', '.join(missing)}"
    repo = path[1:].split("/resolve/", 1)[0]
    if response.headers["X-Repo-Commit"] != hub.commit_of(repo):
        return f"{path}: X-Repo-Commit {response.headers['X-Repo-Commit']}"
    return None


async def _warm(
    port: int, pairs: Sequence[tuple[str, str]], concurrency: int, budget_s: float
) -> WarmReport:
    report = WarmReport(requests=len(pairs))
    pending = iter(pairs)
    # A new connection per request: with several workers, connections are what SO_REUSEPORT
    # spreads, so every worker gets its share of the pass.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.monotonic()
    deadline = started + budget_s
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for path, ip in pending:
                if time.monotonic() > deadline:
                    return
                url = f"http://127.0.0.1:{port}{path}"
                headers = {"X-Forwarded-For": ip}
                async with session.get(url, headers=headers, allow_redirects=False) as response:
                    await response.read()
                    report.answers += 1
                    problem = _problem(path, response)
                    if problem is not None:
                        report.problems.append(problem)
                    else:
                        report.nodes[response.headers["X-Mirror-Node"]] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    report.seconds = time.monotonic() - started
    if report.answers < report.requests:
        report.problems.append(
            f"warm pass unfinished: {report.answers:,} of {report.requests:,} requests "
            f"answered within {budget_s:g} s"
        )
    return report


def warm(
    port: int,
    pairs: Sequence[tuple[str, str]],
    *,
    concurrency: int = 8,
    budget_s: float = WARM_BUDGET_S,
) -> WarmReport:
    """One request per pair through the gateway (within ``budget_s``); every answer must be a
    complete HF redirect with the right commit."""
    return asyncio.run(_warm(port, pairs, concurrency, budget_s))


@dataclass
class HostileReport:
    requests: int = 0
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)


def hostile_request(index: int, repos: int, paths: int, rng: random.Random) -> tuple[str, str]:
    """Request ``index`` of the hostile pass: the first ``paths`` are distinct ~4 KB paths of
    files that do not exist (a 404 each), the rest ask for real files; every one comes from a
    new random IPv4 address."""
    repo = hub.repo_id(index % repos)
    if index < paths:
        path = f"/{repo}/resolve/{hub.REVISION}/missing-{index:07d}-{'x' * HOSTILE_PATH_PAD}"
    else:
        path = hub.resolve_path(repo, hub.REVISION, index % LOAD_FILES_PER_REPO)
    return path, str(ipaddress.IPv4Address(rng.getrandbits(32)))


async def _hostile(
    port: int, requests: int, repos: int, paths: int, seed: int, budget_s: float
) -> HostileReport:
    report = HostileReport()
    rng = random.Random(seed)
    pending = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=HOSTILE_CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.monotonic()
    deadline = started + budget_s
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for index in pending:
                if time.monotonic() > deadline:
                    return
                path, ip = hostile_request(index, repos, paths, rng)
                url = f"http://127.0.0.1:{port}{path}"
                headers = {"X-Forwarded-For": ip}
                async with session.get(url, headers=headers, allow_redirects=False) as response:
                    await response.read()
                    report.statuses[response.status] += 1
                    report.requests += 1

        await asyncio.gather(*(worker() for _ in range(HOSTILE_CONCURRENCY)))
    report.seconds = time.monotonic() - started
    return report


def hostile(
    port: int, requests: int, *, repos: int, paths: int, seed: int, budget_s: float
) -> HostileReport:
    """Distinct missing-file paths, then real files, every request from a new random client:
    what would grow any cache keyed by what clients send."""
    return asyncio.run(_hostile(port, requests, repos, paths, seed, budget_s))
