"""The routing simulator's world run for real, to hold the simulator to what the gateway does.

The world's nodes become real HTTP servers on loopback (``nodes`` below: one process, one
listener per node), each answering the gateway's probe, publishing its load the way the world
says (``/load``, active downloads plus its background share; third-party nodes publish none)
and holding every download for ``hold_s``. A real gateway (``mirror-gateway serve --workers N``)
routes with Redis shared between its workers, probing the nodes every ``reading_s``, its catalog
filled by a local upstream (``hub``). The same client sample the simulator draws arrives at the
same times, each asking the gateway through ``X-Forwarded-For`` and then downloading from the
node the redirect names, so loads rise as clients download.

Each decision is measured as the simulator measures it (the nearest eligible node at that moment,
from the downloads under way), peaks are what the nodes themselves saw, and the report is the
simulator's own (``routing_sim.summarize``), printed beside the simulation of the same clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml
from aiohttp import web

from bench_support import hub, procs
from bench_support.routing_sim import (
    REPO,
    SIM_KEYS,
    Options,
    Outcome,
    Result,
    SimClient,
    SimNode,
    World,
    nearest_eligible,
    node_km,
    optimum_mean_km,
)
from gateway.config import read_yaml

#: Gateway requests in flight at once (a client's redirect is quick; its download is not).
GATEWAY_CONNECTIONS = 64
#: Seconds for servers to start, and for one gateway answer.
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
#: Probe rounds after start-up before clients arrive: every node must be seen up (``rise``).
WARM_ROUNDS = 3
#: Requests per worker that warm the workers' catalogs (``_warm_catalogs``): with N workers each
#: misses a given one with probability 1 - 1/N, so all 16 N miss it with about e^-16.
WARM_REQUESTS_PER_WORKER = 16


# --------------------------------------------------------------------------- the nodes


@dataclass(frozen=True, slots=True)
class LiveNode:
    node_id: str
    capacity: int
    background: float
    publishes_load: bool


def _node_app(
    node: LiveNode, active: Counter[str], peak: Counter[str], hold_s: float
) -> web.Application:
    async def probe(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def load(request: web.Request) -> web.Response:
        if not node.publishes_load:
            raise web.HTTPNotFound()
        carried = node.background * node.capacity + active[node.node_id]
        return web.json_response({"active_connections": carried})

    async def peaks(request: web.Request) -> web.Response:
        return web.json_response(dict(peak))

    async def download(request: web.Request) -> web.Response:
        active[node.node_id] += 1
        peak[node.node_id] = max(peak[node.node_id], active[node.node_id])
        try:
            await asyncio.sleep(hold_s)
        finally:
            active[node.node_id] -= 1
        return web.Response(body=b"x" * 64)

    app = web.Application()
    app.router.add_get("/", probe)
    app.router.add_get("/load", load)
    app.router.add_get("/_peaks", peaks)
    app.router.add_get("/{tail:.+}", download)
    return app


async def serve_nodes(nodes: Sequence[LiveNode], hold_s: float, ports_file: Path) -> None:
    """Every node's listener, until SIGTERM; their ports go to ``ports_file`` once all listen.

    Each listener takes a port the kernel picks as it binds: ports picked beforehand and bound
    later can be taken meanwhile as the source port of some other connection.
    """
    active: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    runners = []
    ports = {}
    for node in nodes:
        runner = web.AppRunner(_node_app(node, active, peak, hold_s), access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        ports[node.node_id] = sock.getsockname()[1]
        await web.SockSite(runner, sock, backlog=4096).start()
        runners.append(runner)
    written = ports_file.with_suffix(".tmp")
    written.write_text(json.dumps(ports))
    written.rename(ports_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


# --------------------------------------------------------------------------- the run


def _raise_fd_limit() -> None:
    """Every held download is a socket on each side: the soft limit goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def gateway_config(
    config_path: Path | None,
    world_path: Path,
    ports: dict[str, int],
    *,
    upstream: str,
    redis_url: str,
    reading_s: float,
    asn_db: Path | None,
    city_db: Path | None,
) -> dict[str, Any]:
    """The config the simulation reads (``config_path``) with the world's nodes at their local
    servers, the local upstream and Redis, and probing every ``reading_s``."""
    data: dict[str, Any] = dict(read_yaml(config_path)) if config_path is not None else {}
    raw = yaml.safe_load(world_path.read_text(encoding="utf-8"))
    nodes = []
    for entry in raw["nodes"]:
        node = {k: v for k, v in entry.items() if k not in SIM_KEYS}
        node["url"] = f"http://127.0.0.1:{ports[node['id']]}"
        if entry.get("publishes_load", True):
            node["load_url"] = f"{node['url']}/load"
        nodes.append(node)
    geoip = {k: v for k, v in (data.get("geoip") or {}).items() if k not in ("asn_db", "city_db")}
    if asn_db is not None:
        geoip["asn_db"] = str(asn_db)
    if city_db is not None:
        geoip["city_db"] = str(city_db)
    probing = {**(data.get("probing") or {}), "enabled": True, "interval_s": reading_s}
    return {
        **data,
        "server": {"host": "127.0.0.1"},
        "client_ip": {
            "trusted_proxies": ["127.0.0.0/8"],
            "forwarded_header": "x-forwarded-for",
        },
        "geoip": geoip,
        "upstream": {"url": upstream},
        "redis": {"url": redis_url},
        "probing": probing,
        "logging": {"format": "json", "access": False},
        "nodes": nodes,
    }


def write_asn_db(path: Path, clients: Sequence[SimClient]) -> None:
    """An ASN database answering each client's own address with the network it was given."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from geoworld import WorldRecord, build_asn_db
    finally:
        sys.path.remove(str(REPO / "tests"))
    records = [
        WorldRecord(
            f"{client.ip}/32", client.location.country or "", "", None, 0.0, 0.0,
            client.location.asn, f"AS{client.location.asn}",
        )
        for client in clients
        if client.location.asn is not None
    ]  # fmt: skip
    build_asn_db(path, records)


class _Run:
    """The clients' side: arrivals, redirects, downloads, and each decision's yardstick."""

    def __init__(
        self,
        world: World,
        clients: Sequence[SimClient],
        options: Options,
        by_port: dict[int, SimNode],
    ) -> None:
        self.world, self.clients, self.options = world, clients, options
        self.by_port = by_port
        #: Downloads under way per node, from these clients.
        self.active: Counter[str] = Counter()
        self.outcomes: list[Outcome] = []
        self.failures: Counter[str] = Counter()

    def is_free(self, node: SimNode) -> bool:
        return node.background * node.capacity + self.active[node.config.id] < node.capacity

    async def client(
        self, client: SimClient, gateway: aiohttp.ClientSession, nodes: aiohttp.ClientSession,
        url: str,
    ) -> None:  # fmt: skip
        nearest, domestic_free = nearest_eligible(self.world, client.location, self.is_free)
        try:
            async with gateway.get(
                url, headers={"X-Forwarded-For": str(client.ip)}, allow_redirects=False
            ) as response:
                await response.read()
                location = response.headers.get("Location", "")
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.failures[f"gateway: {type(exc).__name__}"] += 1
            return
        if status != 302:
            self.failures[f"gateway: status {status}"] += 1
            return
        node = self.by_port.get(urlsplit(location).port or 0)
        config = node.config if node else None
        self.outcomes.append(
            Outcome(
                client, config,
                node_km(config, client.location) if config else math.nan,
                nearest.config if nearest else None,
                node_km(nearest.config, client.location) if nearest else math.nan,
                domestic_free,
            )
        )  # fmt: skip
        if node is None:
            return  # upstream: nothing held on a node
        self.active[node.config.id] += 1
        try:
            async with nodes.get(location) as download:
                await download.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.failures[f"download: {type(exc).__name__}"] += 1
        finally:
            self.active[node.config.id] -= 1

    async def run(self, gateway_port: int, path: str) -> None:
        rng_times = arrival_times(len(self.clients), self.options)
        url = f"http://127.0.0.1:{gateway_port}{path}"
        timeout = aiohttp.ClientTimeout(total=self.options.hold_s + REQUEST_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=GATEWAY_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            ) as gateway,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout
            ) as nodes,
        ):
            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks = []
            for at, client in sorted(zip(rng_times, self.clients, strict=True), key=lambda p: p[0]):
                delay = start + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self.client(client, gateway, nodes, url)))
            await asyncio.gather(*tasks)


def _warm_catalogs(port: int, path: str, workers: int) -> None:
    """Every worker's catalog holds the file before clients arrive, as a running gateway's
    does: otherwise each worker's first requests wait for its upstream lookup together and
    are all answered in one burst, from one state. ``/explain`` reads the catalog as a
    redirect does but counts nothing; each request on a new connection reaches a worker the
    kernel picks, so a few dozen per worker reach every one."""
    for _ in range(WARM_REQUESTS_PER_WORKER * workers):
        status, _body = procs.http_get(port, f"/explain{path}")
        if status != 200:
            raise procs.BenchError(f"explain answered {status} while warming the catalogs")


def _wait_for_ports(server: procs.Server, ports_file: Path) -> dict[str, int]:
    """The nodes' ports, once every node listens."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ports_file.exists():
        server.check_alive()
        if time.monotonic() > deadline:
            raise procs.BenchError(f"the nodes did not listen within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    return {str(k): int(v) for k, v in json.loads(ports_file.read_text()).items()}


def arrival_times(count: int, options: Options) -> list[float]:
    """Each client's arrival, as the simulator draws it (``routing_sim._Simulation``)."""
    rng = random.Random(options.seed)
    return [rng.uniform(0.0, options.arrival_s) for _ in range(count)]


def run_live(
    world: World,
    world_path: Path,
    config_path: Path | None,
    clients: Sequence[SimClient],
    options: Options,
    *,
    workers: int,
    city_db: Path | None,
) -> tuple[Result, Counter[str]]:
    """The world for real; the outcomes with the nodes' own peaks, and any failures."""
    _raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="routing-live-") as tmp:
        workdir = Path(tmp)
        processes = procs.Processes(workdir)
        paths = os.pathsep.join([str(REPO), str(REPO / "scripts")])
        env = {**os.environ, "PYTHONPATH": paths, "TMPDIR": str(workdir)}
        try:
            _, redis_url = procs.start_redis(processes)
            upstream_port = procs.free_port()
            upstream = processes.start(
                "upstream",
                [sys.executable, "-m", "bench_support.hub", "--port", str(upstream_port),
                 "--repos", "1", "--files", "2"],
                port=upstream_port, env=env,
            )  # fmt: skip
            live_nodes = [
                LiveNode(n.config.id, int(n.capacity), n.background, n.publishes_load)
                for n in world.nodes
            ]
            spec, ports_file = workdir / "nodes.json", workdir / "ports.json"
            spec.write_text(json.dumps([dataclasses.asdict(node) for node in live_nodes]))
            nodes_server = processes.start(
                "nodes",
                [sys.executable, "-m", "bench_support.routing_live", "--serve-nodes", str(spec),
                 "--ports-file", str(ports_file), "--hold-s", str(options.hold_s)],
                port=0, env=env,
            )  # fmt: skip
            ports = _wait_for_ports(nodes_server, ports_file)
            first_port = ports[live_nodes[0].node_id]
            asn_db = None
            if options.asn:
                asn_db = workdir / "clients-ASN.mmdb"
                write_asn_db(asn_db, clients)
            config = gateway_config(
                config_path, world_path, ports, upstream=f"http://127.0.0.1:{upstream_port}",
                redis_url=redis_url, reading_s=options.reading_s, asn_db=asn_db, city_db=city_db,
            )  # fmt: skip
            config_file = workdir / "gateway.yaml"
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            gateway_port = procs.free_port()
            gateway = processes.start(
                "gateway",
                [sys.executable, "-m", "gateway", "serve", "--config", str(config_file),
                 "--port", str(gateway_port), "--workers", str(workers), "--log-level", "WARNING"],
                port=gateway_port, env=env,
            )  # fmt: skip
            for server in (upstream, gateway):
                procs.wait_http(server, "/healthz", START_TIMEOUT_S)
            repo = hub.repo_id(0)
            path = hub.resolve_path(repo, hub.commit_of(repo), 1)
            _warm_catalogs(gateway_port, path, workers)
            rise = int(config["probing"].get("rise", 2))
            time.sleep((rise + WARM_ROUNDS) * options.reading_s)
            by_port = {ports[n.config.id]: n for n in world.nodes}
            run = _Run(world, clients, options, by_port)
            asyncio.run(run.run(gateway_port, path))
            _, body = procs.http_get(first_port, "/_peaks")
            peak = Counter({str(k): int(v) for k, v in json.loads(body).items()})
            for server in (gateway, nodes_server):
                server.check_alive()
        finally:
            processes.stop_all()
    result = Result(
        outcomes=run.outcomes, peak=peak, optimum_km=optimum_mean_km(world, clients),
        nodes=world.nodes, domestic=world.config.routing.domestic_first,
    )  # fmt: skip
    return result, run.failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="node servers of a live routing run")
    parser.add_argument("--serve-nodes", type=Path, required=True)
    parser.add_argument("--ports-file", type=Path, required=True)
    parser.add_argument("--hold-s", type=float, required=True)
    args = parser.parse_args(argv)
    nodes = [LiveNode(**entry) for entry in json.loads(args.serve_nodes.read_text())]
    _raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_nodes(nodes, args.hold_s, args.ports_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
