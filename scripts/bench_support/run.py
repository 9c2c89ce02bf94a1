"""scripts/bench: the gateway's request path under load, against a bare aiohttp baseline.

For each worker count and node count it starts the gateway (``mirror-gateway serve --workers
N``) on a fresh Redis with the nodes' live state seeded, warms the catalog from a local
upstream (one checked request per path), runs wrk once to warm up and once to measure, then
measures the baseline (a bare aiohttp + uvloop app answering a fixed 302, same worker count)
with the same requests. Then the memory of a worker holding 10,000 nodes and 100,000 cached
files, and optionally a py-spy profile. It prints the method, a table and the target checks.

Exit status: 0 when every run completed without a request error (targets missed are
reported, not fatal), 1 when a run had request errors, 2 when setup failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis
import yaml

from bench_support import hub, load, procs, profiling, world
from bench_support.procs import BenchError, Processes, Server
from gateway.config import StateConfig
from gateway.state.store import SETTLE_S as ESTIMATES_SETTLE_S

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
#: The paths wrk requests: 50 repos x 20 files, each by branch and by commit (2,000 paths).
LOAD_REPOS = 50
LOAD_FILES = 20
#: The memory figure: 1,000 repos x 100 files = 100,000 files in each worker's catalog.
MEMORY_FILES = 100
MEMORY_REPOS = 1000
QUICK_MEMORY_REPOS = 100
#: The hostile pass after the memory figure: distinct 404 paths (half the requests), then real
#: files, each request from a new random client (quick: a tenth). Growth past the caches'
#: stated bounds fails the run.
HOSTILE_REQUESTS = 200_000
HOSTILE_BUDGET_S = 900.0
#: What the request-path caches may hold together at most (docs/architecture.md lists them):
#: located clients 65,536 (~26 MiB), GeoIP prefixes 65,536 (~13 MiB), ranked nodes 500,000
#: (~100 MiB), resolve paths 16,384 (~6 MiB); the rest is allocator slack.
HOSTILE_GROWTH_BOUND_MIB = 200.0
START_TIMEOUT_S = 90.0
#: Cores used outside the benchmark during a run above which the run is flagged as disturbed.
NOISY_CORES = 0.15
QUIET_SAMPLE_S = 2.0
#: Pause after stopping a gateway: the kernel takes a moment to reclaim gigabytes of it.
SETTLE_S = 2.0
#: Gateway warnings every run has: the bundled GeoIP data is old (that is the point of it).
EXPECTED_WARNINGS = ("GeoIP city database in use is the bundled",)
EXIT_RUN_FAILED = 1
EXIT_SETUP_FAILED = 2

# Performance targets (docs/performance.md).
TARGET_RATIO = 0.75
TARGET_P99_FACTOR = 2.0
TARGET_SCALING = 1.7
TARGET_NODES_DROP = 0.20
#: A gateway's warm-up run outlasts its first redirect window and the settling of that
#: window's load estimates. They give every node that publishes no load its first estimate at
#: once (1,000 of 10,000 nodes), which a process does once, after it starts; measured runs
#: then see the routine windows of a gateway in service (a few hundred changes each).
GATEWAY_WARMUP_S = StateConfig().redirect_window_s + ESTIMATES_SETTLE_S + 1.0


@dataclass(frozen=True)
class Options:
    duration_s: float
    warmup_s: float
    connections: int
    threads: int
    workers: tuple[int, ...]
    nodes: tuple[int, ...]
    quick: bool
    profile: bool
    access_log: bool
    memory_repos: int
    hostile_requests: int
    seed: int
    keep: bool


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of numbers"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be 1 or more")
    return values


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, help="seconds per measured run (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="wrk threads (default 1: wrk shares the machine's cores with the server)",
    )
    parser.add_argument("--workers", type=_counts, help="worker counts (default 1,2)")
    parser.add_argument("--nodes", type=_counts, help="node counts (default 20,1000,10000)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s runs, 1 worker and 20 nodes unless given, a smaller memory figure",
    )
    parser.add_argument("--profile", action="store_true", help="also profile 1 worker under py-spy")
    parser.add_argument(
        "--access-log", action="store_true", help="keep the gateway's access log on"
    )
    parser.add_argument(
        "--hostile",
        type=int,
        help=f"requests of the hostile pass (default {HOSTILE_REQUESTS:,}, a tenth with --quick; "
        "the first half have distinct 404 paths)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated world")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs)"
    )
    args = parser.parse_args(argv)
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    quick = bool(args.quick)
    duration = args.duration if args.duration is not None else (3.0 if quick else 10.0)
    if duration <= 0:
        parser.error("--duration must be positive")
    hostile = args.hostile if args.hostile is not None else HOSTILE_REQUESTS // (10 if quick else 1)
    if hostile < 0:
        parser.error("--hostile must be 0 or more")
    return Options(
        duration_s=duration,
        warmup_s=1.0 if quick else 2.0,
        connections=args.connections,
        threads=args.threads,
        workers=args.workers or ((1,) if quick else (1, 2)),
        nodes=args.nodes or ((20,) if quick else (20, 1000, 10000)),
        quick=quick,
        profile=args.profile,
        access_log=args.access_log,
        memory_repos=QUICK_MEMORY_REPOS if quick else MEMORY_REPOS,
        hostile_requests=hostile,
        seed=args.seed,
        keep=args.keep,
    )


# --------------------------------------------------------------------------- results


@dataclass
class Measured:
    result: load.WrkResult
    #: CPU cores the server's processes used during the run (CPU seconds / wall seconds).
    cores: float
    #: Cores used by everything else on the machine meanwhile (other processes, and kernel
    #: work not charged to a process), and cores the hypervisor took away (steal). Noise: a
    #: quiet machine shows about 0.0 for both.
    other_cores: float
    steal_cores: float

    @property
    def wrk_cores(self) -> float:
        return self.result.wrk_cpu_s / self.result.duration_s


@dataclass
class Row:
    workers: int
    nodes: int
    gateway: Measured | None = None
    baseline: Measured | None = None
    rss_mib: list[float] = field(default_factory=list)
    #: Share of the warm pass's answers that went to a node (the rest: upstream).
    node_share: float = 0.0
    failures: list[str] = field(default_factory=list)
    #: Warnings and errors the gateway logged (besides the expected ones), counted.
    warnings: Counter[str] = field(default_factory=Counter)

    @property
    def ratio(self) -> float | None:
        if self.gateway is None or self.baseline is None or not self.baseline.result.rps:
            return None
        return self.gateway.result.rps / self.baseline.result.rps

    @property
    def errors(self) -> int:
        return sum(m.result.error_total for m in (self.gateway, self.baseline) if m)


@dataclass
class MemoryFigure:
    nodes: int
    files: int
    clients: int
    #: RSS of the worker (MiB): started; with the files cached; after every client was
    #: routed once; after a load run.
    rss_start: float = 0.0
    rss_files: float = 0.0
    rss_clients: float = 0.0
    rss_after_load: float = 0.0
    load: Measured | None = None
    #: RSS after the hostile pass, and what that pass got.
    rss_after_hostile: float = 0.0
    hostile: load.HostileReport | None = None
    #: The load run again after the hostile pass filled the caches with strangers.
    load_after_hostile: Measured | None = None
    failures: list[str] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, options: Options, workdir: Path, processes: Processes) -> None:
        self.options = options
        self.workdir = workdir
        self.processes = processes
        self.clients: list[world.Client] = []
        self.asn_db = workdir / "bench-ASN.mmdb"
        self.redis_url = ""
        self.hub: Server | None = None
        self.load_data = workdir / "load-data.lua"
        self.paths: list[str] = []
        self.load_pairs: list[tuple[str, str]] = []
        self.workers_flag = _serve_has_workers_flag()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        progress("sampling client addresses, building the ASN database, starting Redis")
        self.clients = world.sample_clients(self.options.seed)
        world.build_asn_db(self.asn_db, self.clients)
        _, self.redis_url = procs.start_redis(self.processes)
        repos = max(LOAD_REPOS, self.options.memory_repos)
        port = procs.free_port()
        self.hub = self.processes.start(
            "upstream",
            [sys.executable, "-m", "bench_support.hub", "--port", str(port),
             "--repos", str(repos), "--files", str(max(LOAD_FILES, MEMORY_FILES))],
            port=port,
            env=_child_env(self.workdir),
        )  # fmt: skip
        procs.wait_http(self.hub, "/healthz", START_TIMEOUT_S)
        paths = [
            hub.resolve_path(hub.repo_id(r), revision, f)
            for r in range(LOAD_REPOS)
            for revision in (hub.REVISION, hub.commit_of(hub.repo_id(r)))
            for f in range(LOAD_FILES)
        ]
        self.paths = paths
        self.load_pairs = load.request_mix(paths, self.ips, self.options.seed)
        load.write_lua_data(self.load_data, self.load_pairs)

    @property
    def ips(self) -> list[str]:
        return [client.ip for client in self.clients]

    def warm_pairs(self, workers: int) -> list[tuple[str, str]]:
        """Every path and every client once, so that the catalog and the gateway's per-client
        caches (GeoIP, node ranking per location) are warm when measuring. Each request goes
        to a random worker, so with several workers every client comes back ``3 * workers``
        times: a worker then misses a given client with odds (1 - 1/w)^(3w), under 5%."""
        ips = self.ips
        rounds = 1 if workers == 1 else 3 * workers
        count = max(len(self.paths), rounds * len(ips))
        return [(self.paths[i % len(self.paths)], ips[i % len(ips)]) for i in range(count)]

    def warm(self, label: str, port: int, pairs: Sequence[tuple[str, str]]) -> load.WarmReport:
        progress(f"{label}: warm pass of {len(pairs):,} requests")
        report = load.warm(port, pairs)
        progress(
            f"{label}: warm pass took {report.seconds:.1f} s ({report.rate:,.0f} req/s, first "
            f"sight of each path and client){'; PROBLEMS' if report.problems else ''}"
        )
        return report

    def _hub_stats(self) -> dict[str, int]:
        assert self.hub is not None
        _, body = procs.http_get(self.hub.port, "/_stats")
        stats: dict[str, int] = json.loads(body)
        return stats

    # ------------------------------------------------------------------ servers

    def start_gateway(self, name: str, nodes: int, workers: int) -> Server:
        assert self.hub is not None
        config = world.gateway_config(
            nodes=world.make_nodes(nodes, self.clients, self.options.seed),
            upstream_url=f"http://127.0.0.1:{self.hub.port}",
            redis_url=self.redis_url,
            asn_db=self.asn_db,
            access_log=self.options.access_log,
        )
        # A fresh Redis per gateway: no catalog or live state left by the previous one.
        with redis.Redis.from_url(self.redis_url, socket_timeout=10) as client:
            client.flushall()
        progress(f"{name}: seeding the live state of {nodes:,} nodes in Redis")
        nodes_up = world.seed_live_state(self.redis_url, config, self.options.seed)
        config_path = self.workdir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = procs.free_port()
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]  # fmt: skip
        if self.workers_flag:
            argv += ["--workers", str(workers)]
        server = self.processes.start(name, argv, port=port, env=_child_env(self.workdir))
        procs.wait_http(server, "/healthz", START_TIMEOUT_S)
        _wait_for_workers(server, workers if self.workers_flag else 1)
        _wait_for_live_state(server, nodes_up, workers)
        progress(f"{name}: serving with {workers} worker(s), {nodes_up:,} of {nodes:,} nodes up")
        return server

    def start_baseline(self, workers: int) -> Server:
        port = procs.free_port()
        server = self.processes.start(
            f"baseline-w{workers}",
            [sys.executable, "-m", "bench_support.baseline", "--port", str(port),
             "--workers", str(workers)],
            port=port,
            env=_child_env(self.workdir),
        )  # fmt: skip
        # It answers every path with a 302, so "listening" is its readiness.
        _wait_for_workers(server, workers)
        self.measure(server, self.options.warmup_s)
        return server

    def measure(self, server: Server, duration_s: float, data: Path | None = None) -> Measured:
        pids = procs.process_tree(server.pid)
        before = procs.cpu_seconds(pids)
        busy_before, steal_before = procs.machine_cpu_seconds()
        result = load.run_wrk(
            f"http://127.0.0.1:{server.port}/",
            data or self.load_data,
            duration_s=duration_s,
            connections=self.options.connections,
            threads=self.options.threads,
        )
        busy_after, steal_after = procs.machine_cpu_seconds()
        server_s = procs.cpu_seconds(pids) - before
        server.check_alive()
        seconds = result.duration_s
        other = (busy_after - busy_before - server_s - result.wrk_cpu_s) / seconds
        return Measured(
            result,
            server_s / seconds,
            other_cores=max(0.0, other),
            steal_cores=(steal_after - steal_before) / seconds,
        )

    # ------------------------------------------------------------------ phases

    def run_row(self, workers: int, nodes: int, baseline: Server) -> Row:
        row = Row(workers, nodes)
        gateway = self.start_gateway(f"gateway-w{workers}-n{nodes}", nodes, workers)
        try:
            label = f"w{workers}/n{nodes}"
            report = self.warm(label, gateway.port, self.warm_pairs(workers))
            row.failures += report.problems[:5]
            row.node_share = 1 - report.to_upstream / max(1, report.answers)
            self.measure(gateway, GATEWAY_WARMUP_S)
            progress(f"{label}: measuring the gateway for {self.options.duration_s:g} s")
            row.gateway = self.measure(gateway, self.options.duration_s)
            row.rss_mib = [r for p in procs.workers_of(gateway.pid)[0] if (r := procs.rss_mib(p))]
        finally:
            self.processes.stop(gateway)
            row.warnings = gateway.log_warnings(EXPECTED_WARNINGS)
        time.sleep(SETTLE_S)
        progress(f"w{workers}/n{nodes}: measuring the baseline for {self.options.duration_s:g} s")
        row.baseline = self.measure(baseline, self.options.duration_s)
        for side, measured in (("gateway", row.gateway), ("baseline", row.baseline)):
            if measured.result.error_total:
                row.failures.append(f"{side}: {measured.result.describe_errors()}")
        return row

    def memory(self) -> MemoryFigure:
        nodes = max(self.options.nodes)
        repos = self.options.memory_repos
        label = f"memory/n{nodes}"
        gateway = self.start_gateway(f"gateway-memory-n{nodes}", nodes, 1)
        figure = MemoryFigure(nodes, repos * MEMORY_FILES, len(self.clients))
        try:
            worker = procs.workers_of(gateway.pid)[0][0]
            figure.rss_start = procs.rss_mib(worker) or 0.0
            before = self._hub_stats()
            ips = self.ips
            # One request per repo fills the catalog: it takes the whole file list of each.
            # Every request from the same client, so this step adds files, not locations.
            fill = [
                (hub.resolve_path(hub.repo_id(r), hub.REVISION, 0), ips[0]) for r in range(repos)
            ]
            report = self.warm(f"{label} catalog", gateway.port, fill)
            figure.failures += report.problems[:5]
            fetched = self._hub_stats()["tree"] - before["tree"]
            if fetched < repos:
                figure.failures.append(f"only {fetched} of {repos} file lists came from upstream")
            figure.rss_files = procs.rss_mib(worker) or 0.0
            # Then every client once (on cached paths): what per-client state adds.
            seen = [(self.paths[i % len(self.paths)], ip) for i, ip in enumerate(ips)]
            figure.failures += self.warm(f"{label} clients", gateway.port, seen).problems[:5]
            figure.rss_clients = procs.rss_mib(worker) or 0.0
            # Then load over all the files from all the clients.
            paths = [
                hub.resolve_path(hub.repo_id(r), hub.REVISION, f)
                for r in range(repos)
                for f in range(MEMORY_FILES)
            ]
            data = self.workdir / "memory-data.lua"
            load.write_lua_data(data, load.request_mix(paths, ips, self.options.seed))
            progress(f"{label}: load run")
            figure.load = self.measure(gateway, min(self.options.duration_s, 5.0), data)
            if figure.load.result.error_total:
                figure.failures.append(f"memory run: {figure.load.result.describe_errors()}")
            figure.rss_after_load = procs.rss_mib(worker) or 0.0
            requests = self.options.hostile_requests
            progress(f"{label}: hostile pass of {requests:,} requests")
            figure.hostile = load.hostile(
                gateway.port,
                requests,
                repos=repos,
                paths=requests // 2,
                seed=self.options.seed,
                budget_s=HOSTILE_BUDGET_S,
            )
            figure.rss_after_hostile = procs.rss_mib(worker) or 0.0
            growth = figure.rss_after_hostile - figure.rss_after_load
            if growth > HOSTILE_GROWTH_BOUND_MIB:
                figure.failures.append(
                    f"hostile pass grew the worker by {growth:,.0f} MiB, past the caches' "
                    f"bound of {HOSTILE_GROWTH_BOUND_MIB:,.0f} MiB"
                )
            unexpected = set(figure.hostile.statuses) - {302, 404}
            if unexpected:
                figure.failures.append(f"hostile pass answers: {dict(figure.hostile.statuses)}")
            progress(f"{label}: load run after the hostile pass")
            after = self.measure(gateway, min(self.options.duration_s, 5.0), data)
            figure.load_after_hostile = after
            if after.result.error_total:
                figure.failures.append(f"run after hostile: {after.result.describe_errors()}")
        finally:
            self.processes.stop(gateway)
            figure.warnings = gateway.log_warnings(EXPECTED_WARNINGS)
        return figure

    def profile(self, nodes: int, py_spy: str) -> tuple[Measured, profiling.Profile]:
        gateway = self.start_gateway(f"gateway-profile-n{nodes}", nodes, 1)
        try:
            self.warm(f"profile/n{nodes}", gateway.port, self.warm_pairs(1))
            self.measure(gateway, GATEWAY_WARMUP_S)
            progress(f"profile/n{nodes}: profiling for {self.options.duration_s:g} s")
            worker = procs.workers_of(gateway.pid)[0][0]
            output = self.workdir / f"profile-n{nodes}.txt"
            spy = profiling.start(py_spy, worker, self.options.duration_s, output)
            try:
                time.sleep(0.5)  # py-spy attaches before the load starts
                measured = self.measure(gateway, self.options.duration_s)
                spy.wait(timeout=self.options.duration_s + 30)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait()
            if spy.returncode != 0 or not output.exists():
                log = output.with_suffix(".log").read_text(errors="replace")
                raise BenchError(f"py-spy failed ({spy.returncode}):\n{log}")
        finally:
            self.processes.stop(gateway)
        return measured, profiling.summarize(output, REPO)


# --------------------------------------------------------------------------- helpers


_STARTED = time.monotonic()


def progress(message: str) -> None:
    """What the bench is doing, on stderr: the results on stdout stay a clean report."""
    print(f"[{time.monotonic() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def _child_env(workdir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MIRROR_GATEWAY_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")]))
    # Temporary files of the servers (the workers' metrics directory) go with the work dir.
    env["TMPDIR"] = str(workdir)
    return env


def _serve_has_workers_flag() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    return "--workers" in done.stdout


def _wait_for_workers(server: Server, workers: int) -> None:
    """Until every worker listens: measuring earlier would load the first ones only."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while procs.listening_sockets(server.port) < workers:
        server.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(
                f"{server.name}: {procs.listening_sockets(server.port)} of {workers} workers "
                f"listening after {START_TIMEOUT_S:g} s:\n{server.log_tail()}"
            )
        time.sleep(0.05)


def _wait_for_live_state(server: Server, nodes_up: int, workers: int) -> None:
    """Until /readyz shows the seeded state (not degraded, the seeded number of nodes up) on
    several answers in a row: with several workers each answer comes from a random one."""
    deadline = time.monotonic() + START_TIMEOUT_S
    streak, last = 0, b""
    while streak < 4 * workers:
        server.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name}: live state not loaded; /readyz said {last!r}")
        try:
            status, last = procs.http_get(server.port, "/readyz")
            body = json.loads(last)
            ok = status == 200 and body["status"] == "ready" and body["nodes_up"] == nodes_up
        except (OSError, ValueError, KeyError):
            ok = False
        streak = streak + 1 if ok else 0
        if not ok:
            time.sleep(0.05)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    return ((done.stdout or done.stderr).splitlines() or ["?"])[0].strip()


def _machine() -> str:
    cpu_model = "?"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return (
        f"{os.cpu_count()} CPUs ({cpu_model}), {mem_kib / 2**20:.1f} GiB RAM, "
        f"Linux {platform.release()}"
    )


def _code_state() -> str:
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"git {commit}" + (" with uncommitted changes in gateway/" if dirty else "")


# --------------------------------------------------------------------------- report


def background_load() -> tuple[float, float]:
    """Cores busy and stolen while the benchmark itself is idle: other work on the machine."""
    busy, steal = procs.machine_cpu_seconds()
    time.sleep(QUIET_SAMPLE_S)
    busy_after, steal_after = procs.machine_cpu_seconds()
    return (busy_after - busy) / QUIET_SAMPLE_S, (steal_after - steal) / QUIET_SAMPLE_S


def print_method(bench: Bench) -> None:
    o = bench.options
    countries = len({c.country for c in bench.clients})
    cn = sum(c.country == "CN" for c in bench.clients)
    lines = [
        "== mirror-gateway benchmark: method",
        f"machine:   {_machine()}",
        f"software:  Python {platform.python_version()}, aiohttp {_version('aiohttp')}, "
        f"uvloop {_version('uvloop')}, {load.wrk_version()}, "
        f"{_first_line(['redis-server', '--version']).split(' sha=')[0]}",
        f"code:      {_code_state()}",
        f"load:      wrk, {o.threads} thread(s), {o.connections} keep-alive connections, "
        f"{o.duration_s:g} s per measured run after a warm-up run ({o.warmup_s:g} s for the "
        f"baseline, {GATEWAY_WARMUP_S:g} s for the gateway: past its first redirect window's "
        "load estimates); "
        f"wrk request timeout {load.WRK_TIMEOUT_S} s",
        f"requests:  GET of {len(bench.paths):,} resolve paths ({LOAD_REPOS} repos x "
        f"{LOAD_FILES} files, by branch and by commit), each from one of "
        f"{len(bench.clients):,} client IPs ({countries} countries, {cn} in CN) named in "
        "X-Forwarded-For by the trusted peer 127.0.0.1 (bench_support/load.lua)",
        "cpu:       nothing pinned: wrk and the server share the cores and the kernel "
        "schedules them; each run reports the cores the server and wrk used",
        f"gateway:   mirror-gateway serve --workers N{'' if bench.workers_flag else ' (NOT SUPPORTED: 1 worker only)'}; "  # noqa: E501
        "full path: trusted XFF, GeoIP City (bundled GeoLite2) + ASN (built per run), "
        "live-state scoring, catalog revision check, HF headers, Prometheus metrics; "
        f"access log {'on' if o.access_log else 'off (--access-log to include it)'}",
        "live state: probing off, as the nodes are not servers; instead the records a prober "
        "and operators publish (latency for all nodes, ~3% down, ~2% transport-failing, "
        "loads, ~2% drained/disabled) are seeded in Redis and loaded and resynced by "
        "every worker, and the scoring reads them per request",
        "warm-up:   a local upstream API (bench_support/hub.py) fills the catalog; before "
        "measuring, every path and every client is requested once (3 x workers times with "
        "several workers, so each worker sees each), each answer checked (302, HF headers, "
        "commit); the warm pass's own rate shows the cost of first sight",
        "baseline:  bench_support/baseline.py: aiohttp + uvloop answering a fixed 302, "
        "the same number of SO_REUSEPORT worker processes, same requests",
        "caches:    GeoIP lookups (per /24) and node rankings (per client location) are cached "
        "by the gateway; after the warm-up every client is a cache hit",
    ]
    busy, steal = background_load()
    quiet = busy <= NOISY_CORES and steal <= NOISY_CORES
    lines.append(
        f"quiet:     before the runs {busy:.2f} cores were busy and {steal:.2f} stolen"
        + ("" if quiet else " -- WARNING: the machine is not quiet; figures will be disturbed")
    )
    print("\n".join(lines), flush=True)


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _side(m: Measured) -> str:
    r = m.result
    return f"{r.rps:>8,.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {m.cores:>4.2f} {m.wrk_cores:>4.2f}"


def row_line(row: Row) -> str:
    g, b = row.gateway, row.baseline
    if g is None or b is None:
        return f"{row.workers:>7} {row.nodes:>6}  (not measured)"
    rss = "/".join(f"{r:.0f}" for r in row.rss_mib) or "-"
    noise = f"{max(g.other_cores, b.other_cores):.2f}/{max(g.steal_cores, b.steal_cores):.2f}"
    status = "FAILED" if row.failures else "ok"
    return (
        f"{row.workers:>7} {row.nodes:>6} | {_side(g)} | {_side(b)} | {row.ratio or 0:>5.0%} | "
        f"{rss:>7} {row.node_share:>5.0%} {noise:>9} | {row.errors:>6} {status}"
    )


def _table_header() -> str:
    side = f"{'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv':>4} {'wrk':>4}"
    names = (
        f"{'workers':>7} {'nodes':>6} | {side} | {side} | {'ratio':>5} | "
        f"{'RSS MiB':>7} {'node%':>5} {'other/stl':>9} | {'errors':>6}"
    )
    width = len(side)
    groups = f"{'':>14} | {'gateway (g)':^{width}} | {'baseline (b)':^{width}} | {'g/b':>5} |"
    return f"{groups}\n{names}"


TABLE_HEADER = _table_header()
LEGEND = (
    "srv, wrk: CPU cores the server's processes and wrk used; RSS: per worker after the run; "
    "node%: answers sent\nto a node rather than upstream; other/stl: cores used by anything "
    f"else / stolen by the hypervisor\n(noise: a run with more than {NOISY_CORES} is flagged)"
)


def _find(rows: Sequence[Row], workers: int, nodes: int) -> Row | None:
    return next((r for r in rows if r.workers == workers and r.nodes == nodes and r.gateway), None)


def checks(rows: Sequence[Row], options: Options) -> list[str]:
    lines = []
    few = min(options.nodes)
    many = max(options.nodes)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    one = _find(rows, 1, few)
    if one is not None and one.ratio is not None and one.baseline is not None:
        lines.append(
            f"[{verdict(one.ratio >= TARGET_RATIO)}] 1 worker, {few} nodes: gateway "
            f"{one.gateway.result.rps if one.gateway else 0:,.0f} req/s = {one.ratio:.0%} of "
            f"baseline {one.baseline.result.rps:,.0f} (target >= {TARGET_RATIO:.0%})"
        )
    else:
        lines.append(f"[----] 1 worker vs baseline: not measured (needs --workers 1, {few} nodes)")
    # At the fewest nodes and the most: the p99 target covers two workers at 10,000 nodes.
    for workers in options.workers:
        for nodes in sorted({few, many}):
            row = _find(rows, workers, nodes)
            if row is None or row.gateway is None or row.baseline is None:
                continue
            factor = row.gateway.result.p99_ms / max(row.baseline.result.p99_ms, 1e-9)
            lines.append(
                f"[{verdict(factor <= TARGET_P99_FACTOR)}] p99, {workers} worker(s), "
                f"{nodes:,} nodes: {row.gateway.result.p99_ms:.2f} ms = {factor:.2f}x baseline's "
                f"{row.baseline.result.p99_ms:.2f} ms (target <= {TARGET_P99_FACTOR:g}x)"
            )
    two = _find(rows, 2, few)
    if one is not None and two is not None and one.gateway and two.gateway:
        scaling = two.gateway.result.rps / one.gateway.result.rps
        base = ""
        if one.baseline and two.baseline:
            base_scaling = two.baseline.result.rps / one.baseline.result.rps
            base = f"; the baseline scales {base_scaling:.2f}x on this machine"
        lines.append(
            f"[{verdict(scaling >= TARGET_SCALING)}] 2 workers vs 1, {few} nodes: "
            f"{scaling:.2f}x (target >= {TARGET_SCALING:g}x){base}"
        )
    else:
        lines.append(f"[----] 2 workers vs 1: not measured (needs --workers 1,2, {few} nodes)")
    if many != few:
        for workers in options.workers:
            low, high = _find(rows, workers, few), _find(rows, workers, many)
            if low is None or high is None or not low.gateway or not high.gateway:
                continue
            change = high.gateway.result.rps / low.gateway.result.rps - 1
            lines.append(
                f"[{verdict(change >= -TARGET_NODES_DROP)}] {many:,} vs {few} nodes, "
                f"{workers} worker(s): {change:+.0%} req/s (target >= -{TARGET_NODES_DROP:.0%})"
            )
    else:
        lines.append("[----] many vs few nodes: not measured (needs two --nodes counts)")
    noisy = [
        f"w{r.workers}/n{r.nodes} ({m.other_cores:.2f}/{m.steal_cores:.2f})"
        for r in rows
        for m in (r.gateway, r.baseline)
        if m is not None and max(m.other_cores, m.steal_cores) > NOISY_CORES
    ]
    if noisy:
        lines.append(
            "[NOISE] other load or steal above "
            f"{NOISY_CORES} cores during: {', '.join(noisy)}; rerun on a quiet machine"
        )
    for row in rows:
        for message, count in row.warnings.most_common(5):
            lines.append(f"[WARN] w{row.workers}/n{row.nodes} gateway logged {count}x {message}")
    failed = [r for r in rows if r.failures]
    lines.append(
        f"[{'PASS' if not failed else 'FAIL'}] request errors: "
        + (
            "none in any run"
            if not failed
            else "; ".join(f"w{r.workers}/n{r.nodes}: {', '.join(r.failures)}" for r in failed)
        )
    )
    return lines


def print_memory(memory: MemoryFigure) -> None:
    rps = f"{memory.load.result.rps:,.0f} req/s" if memory.load else "-"
    steps = [
        (memory.rss_start, "started with the nodes"),
        (
            memory.rss_files,
            f"with {memory.files:,} files cached ({memory.files // MEMORY_FILES:,} repos x "
            f"{MEMORY_FILES}, one request per repo from one client)",
        ),
        (
            memory.rss_clients,
            f"after routing each of the {memory.clients:,} clients once (GeoIP and "
            "per-location caches)",
        ),
        (memory.rss_after_load, f"after a load run over all files and clients ({rps})"),
    ]
    if memory.hostile is not None:
        report = memory.hostile
        answers = ", ".join(f"{n:,}x {status}" for status, n in sorted(report.statuses.items()))
        steps.append(
            (
                memory.rss_after_hostile,
                f"after a hostile pass of {report.requests:,} requests in {report.seconds:.0f} s "
                f"({answers}): distinct 4 KB 404 paths, then real files, each from a new "
                "random client",
            )
        )
    lines = [
        f"\n== memory: RSS of one worker with {memory.nodes:,} nodes (each worker of a "
        "multi-worker gateway holds its own copy)"
    ]
    previous = None
    for rss, what in steps:
        change = "" if previous is None else f"({rss - previous:+,.0f})"
        lines.append(f"  {rss:>7,.0f} MiB {change:>9}  {what}")
        previous = rss
    lines.append(
        "  (RSS keeps memory freed after start-up, e.g. by parsing the config, so a step can "
        "grow into it unseen)"
    )
    if memory.load is not None and memory.load_after_hostile is not None:
        before, after = memory.load.result.rps, memory.load_after_hostile.result.rps
        lines.append(
            f"  throughput after the hostile pass: {after:,.0f} req/s, "
            f"{after / before:.0%} of the {before:,.0f} req/s before it"
            if before
            else "  throughput after the hostile pass: no figure before it"
        )
    lines += [f"  FAILED: {failure}" for failure in memory.failures]
    lines += [f"  [WARN] gateway logged {n}x {m}" for m, n in memory.warnings.most_common(5)]
    print("\n".join(lines), flush=True)


def print_profile(nodes: int, measured: Measured, profile: profiling.Profile) -> None:
    total = max(1, profile.samples)
    print(
        f"\n== profile: 1 worker, {nodes:,} nodes, py-spy at {profiling.SAMPLE_RATE_HZ} Hz for "
        f"{measured.result.duration_s:.0f} s: {profile.samples:,} busy samples "
        f"({profile.errors if profile.errors is not None else '?'} lost); "
        f"{measured.result.rps:,.0f} req/s under the profiler, {measured.cores:.2f} cores"
    )
    print("top functions by self time (share of busy samples):")
    for name, count in profile.self_time.most_common(20):
        print(f"  {count / total:6.1%}  {name}")
    print("gateway functions by total time (self + callees):")
    for name, count in profiling.gateway_totals(profile)[:15]:
        print(f"  {count / total:6.1%}  {name}")
    print(
        "(uvloop runs callbacks and task steps from C, so stacks start at the coroutine or "
        "callback: totals of\n outer frames are lower bounds; self times are exact)"
    )
    sys.stdout.flush()


# --------------------------------------------------------------------------- main


def _check_tools(options: Options) -> str | None:
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: apt-get install wrk")
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server is not installed: apt-get install redis-server")
    if not options.profile:
        return None
    py_spy = profiling.find_py_spy()
    if py_spy is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return py_spy


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    # SIGTERM (a test's timeout, a CI cancel) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="mirror-gateway-bench-"))
    processes = Processes(workdir)
    keep = options.keep
    try:
        py_spy = _check_tools(options)
        bench = Bench(options, workdir, processes)
        bench.setup()
        print_method(bench)
        rows = run_all(bench)
        memory = bench.memory()
        print_memory(memory)
        if py_spy is not None:
            for nodes in sorted({min(options.nodes), max(options.nodes)}):
                print_profile(nodes, *bench.profile(nodes, py_spy))
        print(f"\n== results (latencies in ms)\n{TABLE_HEADER}")
        for row in rows:
            print(row_line(row))
        print(LEGEND)
        print("\n== targets")
        print("\n".join(checks(rows, options)))
        failed = any(r.failures for r in rows) or bool(memory.failures)
        keep = keep or failed
        return EXIT_RUN_FAILED if failed else 0
    except BenchError as exc:
        keep = True
        print(f"\nbench setup failed: {exc}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # no second interrupt mid-cleanup
        processes.stop_all()
        if keep:
            print(f"work directory (configs, logs): {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_all(bench: Bench) -> list[Row]:
    options = bench.options
    rows: list[Row] = []
    print(f"\n== runs (as they complete)\n{TABLE_HEADER}", flush=True)
    for workers in options.workers:
        if workers > 1 and not bench.workers_flag:
            print(f"{workers:>7}      -  skipped: serve has no --workers flag yet", flush=True)
            continue
        baseline = bench.start_baseline(workers)
        try:
            for nodes in options.nodes:
                row = bench.run_row(workers, nodes, baseline)
                rows.append(row)
                print(row_line(row), flush=True)
        finally:
            bench.processes.stop(baseline)
    return rows
