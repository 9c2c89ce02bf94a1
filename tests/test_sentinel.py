"""Redis Sentinel failover under load: real redis-server primary and replica, three real
redis-sentinel processes and two real gateway processes, all on loopback.

The stated bound: after the primary is killed, both instances are ready on the new primary
within ``FAILOVER_BOUND_S`` (the sentinels need ``DOWN_AFTER_MS`` to call the primary down and
a second or two to elect a leader and promote the replica; the store then reconnects within
its backoff, at most 5 s, and resyncs). From then on an admin change through either instance
reaches the other within ``PROPAGATION_S``, as with a single Redis.

Also here: the primary's password from the environment (as the Helm chart passes it), a wrong
one refused, and sentinel and primary reached over TLS with ``redis.sentinel.tls_ca_file``.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fake_hub import FakeHub
from geoworld import GeoDBs
from live_gateways import (
    FROM_BEIJING,
    RESOLVE,
    admin,
    live_config,
    prober_lock_owner,
    readiness,
    routed_to,
    two_gateways,
)
from mirror_node import MirrorNode
from processes import GatewayProcess, http, request, wait_until
from redis_server import RedisSentinel, RedisServer, free_port

from gateway.config import NodeConfig, RedisConfig, SentinelConfig, StateConfig
from gateway.state.live import AdminRecord, LiveState, RedirectCounter
from gateway.state.store import RedisStore

MASTER = "mg-test"
PASSWORD = "sentinel-test-password"
DOWN_AFTER_MS = 1000
FAILOVER_BOUND_S = 20.0
PROPAGATION_S = 5.0
#: The load: requests alternate between the two instances, one at a time, until told to stop,
#: at most this many or for this long.
LOAD_MAX_REQUESTS = 20_000
LOAD_MAX_S = 90.0


class RedisWithSentinels:
    """A primary, one replica and three sentinels (quorum 2) watching them."""

    def __init__(self, directory: Path) -> None:
        auth = ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
        self.primary = RedisServer(free_port(), directory / "primary", auth)
        self.replica = RedisServer(
            free_port(),
            directory / "replica",
            [*auth, "--replicaof", "127.0.0.1", str(self.primary.port)],
        )
        self.sentinels = [
            RedisSentinel(
                free_port(),
                directory / f"sentinel-{i}",
                master_name=MASTER,
                primary_port=self.primary.port,
                quorum=2,
                auth_pass=PASSWORD,
                down_after_ms=DOWN_AFTER_MS,
            )
            for i in range(3)
        ]

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        replica = self.data_client(self.replica.port)
        try:
            wait_until(
                lambda: replica.info("replication")["master_link_status"] == "up",
                15,
                "the replica to sync",
            )
        finally:
            replica.close()
        for sentinel in self.sentinels:
            sentinel.start()
        # Sentinels find the replica in the primary's INFO and each other through hello
        # messages every 2 s; a failover needs both.
        wait_until(self._topology_known, 30, "the sentinels to know the replica and each other")

    def _topology_known(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.sentinel_master(MASTER)
            if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                return False
        return True

    def primary_port(self) -> int:
        with self.sentinels[0].client() as client:
            _, port = client.sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def data_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=5)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[RedisWithSentinels]:
    cluster = RedisWithSentinels(tmp_path / "redis")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def sentinel_store(
    addresses: tuple[tuple[str, int], ...],
    *,
    password: str | None = None,
    tls_ca_file: Path | None = None,
) -> RedisStore:
    """A store (not started) of the primary the sentinels at ``addresses`` name."""
    config = RedisConfig(
        sentinel=SentinelConfig(
            master_name=MASTER,
            addresses=addresses,
            tls=tls_ca_file is not None,
            tls_ca_file=tls_ca_file,
        ),
        password=password,
        key_prefix="t:",
        connect_timeout_s=1.0,
        command_timeout_s=1.0,
    )
    nodes = (NodeConfig(id="n1", base_url="https://n1.example"),)
    live = LiveState(nodes, vantage="v1", probing=True)
    return RedisStore(live, RedirectCounter(), config, StateConfig(), nodes, instance_id="t")


def sentinel_addresses(cluster: RedisWithSentinels) -> tuple[tuple[str, int], ...]:
    return tuple(("127.0.0.1", sentinel.port) for sentinel in cluster.sentinels)


async def test_store_finds_the_primary_through_the_sentinels(
    sentinel_redis: RedisWithSentinels,
) -> None:
    store = sentinel_store(sentinel_addresses(sentinel_redis), password=PASSWORD)
    await store.start()
    try:
        assert store.degraded_reason is None
        await store.set_admin(AdminRecord("n1", "draining", changed_at=1.0))
    finally:
        # Closing also closes the connections to the sentinels (an unclosed one would warn).
        await store.close()
    primary = sentinel_redis.data_client(sentinel_redis.primary.port)
    try:
        assert primary.hget("t:admin:n1", "mode") == b"draining"
    finally:
        primary.close()

    refused = sentinel_store(sentinel_addresses(sentinel_redis), password="not-the-password")
    await refused.start()
    try:
        assert refused.degraded_reason is not None
        assert "invalid username-password" in refused.degraded_reason.lower()
    finally:
        await refused.close()


def make_certificates(directory: Path) -> dict[str, Path]:
    """A test CA and a certificate for 127.0.0.1 signed by it, made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / name for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    san = directory / "san.cnf"
    san.write_text("subjectAltName=IP:127.0.0.1\n")
    commands = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
         "-keyout", str(files["ca.key"]), "-out", str(files["ca.crt"])],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", str(files["server.key"]), "-out", str(directory / "server.csr")],
        ["x509", "-req", "-days", "1", "-in", str(directory / "server.csr"),
         "-CA", str(files["ca.crt"]), "-CAkey", str(files["ca.key"]), "-CAcreateserial",
         "-extfile", str(san), "-out", str(files["server.crt"])],
    ]  # fmt: skip
    for command in commands:
        subprocess.run(["openssl", *command], capture_output=True, check=True, timeout=60)
    return files


async def test_sentinel_and_primary_over_tls(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    tls = {
        "tls-cert-file": certs["server.crt"],
        "tls-key-file": certs["server.key"],
        "tls-ca-cert-file": certs["ca.crt"],
        "tls-auth-clients": "no",
    }
    # Each process keeps a plaintext port too, for the fixtures' readiness PING only.
    primary_tls_port = free_port()
    primary = RedisServer(
        free_port(),
        tmp_path / "primary",
        [
            "--tls-port",
            str(primary_tls_port),
            *(a for k, v in tls.items() for a in (f"--{k}", str(v))),
        ],
    )
    sentinel_tls_port = free_port()
    sentinel = RedisSentinel(
        free_port(),
        tmp_path / "sentinel",
        master_name=MASTER,
        primary_port=primary_tls_port,
        quorum=1,
        settings=[
            f"tls-port {sentinel_tls_port}",
            "tls-replication yes",  # sentinel talks TLS to the primary too
            *(f"{k} {v}" for k, v in tls.items()),
        ],
    )
    primary.start()
    try:
        sentinel.start()
        try:
            addresses = (("127.0.0.1", sentinel_tls_port),)
            store = sentinel_store(addresses, tls_ca_file=certs["ca.crt"])
            await store.start()
            try:
                assert store.degraded_reason is None
                await store.set_admin(AdminRecord("n1", "disabled", changed_at=1.0))
            finally:
                await store.close()
            with redis.Redis(port=primary.port, socket_timeout=5) as plain:
                assert plain.hget("t:admin:n1", "mode") == b"disabled"
            # Without tls the same sentinel cannot be spoken to: the setting is what did it.
            plaintext = sentinel_store(addresses)
            await plaintext.start()
            try:
                assert plaintext.degraded_reason is not None
            finally:
                await plaintext.close()
        finally:
            sentinel.stop()
    finally:
        primary.stop()


class SteadyLoad:
    """Resolve requests to both instances from a thread, each outcome counted."""

    def __init__(self, gateways: tuple[GatewayProcess, ...]) -> None:
        self.outcomes: Counter[str] = Counter()
        self._gateways = gateways
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        deadline = time.monotonic() + LOAD_MAX_S
        message = request("GET", RESOLVE, FROM_BEIJING)
        for i in range(LOAD_MAX_REQUESTS):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            gateway = self._gateways[i % len(self._gateways)]
            try:
                status, _, _ = http(gateway.port, message)
                self.outcomes[str(status)] += 1
            except OSError as exc:
                self.outcomes[type(exc).__name__] += 1


def test_primary_failover_under_load_loses_no_request(
    sentinel_redis: RedisWithSentinels,
    nodes: dict[str, MirrorNode],
    geo_dbs: GeoDBs,
    fake_hub: FakeHub,
    tmp_path: Path,
) -> None:
    addresses = [f"127.0.0.1:{sentinel.port}" for sentinel in sentinel_redis.sentinels]
    config = live_config(
        geo_dbs,
        fake_hub.url,
        nodes,
        redis={
            "sentinel": {"master_name": MASTER, "addresses": addresses},
            "connect_timeout_s": 0.2,
            "command_timeout_s": 0.2,
        },
    )
    # The password comes from the environment, as the Helm chart passes it from a Secret.
    env = {"MIRROR_GATEWAY_REDIS_PASSWORD": PASSWORD}
    a, b = two_gateways(config, tmp_path, env=env)
    try:
        for gateway in (a, b):
            wait_until(lambda g=gateway: routed_to(g) == "bj", 10, "both instances to trust bj")
            wait_until(lambda g=gateway: readiness(g)["status"] == "ready", 10, "ready")

        with SteadyLoad((a, b)) as load:
            wait_until(lambda: load.outcomes.total() >= 50, 10, "the load to run")
            old_primary = sentinel_redis.primary_port()
            assert old_primary == sentinel_redis.primary.port
            sentinel_redis.primary.kill()
            killed_at = time.monotonic()

            # The gap: both instances say so and keep routing on what they know.
            for gateway in (a, b):
                wait_until(lambda g=gateway: readiness(g)["status"] == "degraded", 10, "degraded")
            for gateway in (a, b):
                wait_until(
                    lambda g=gateway: readiness(g)["status"] == "ready",
                    FAILOVER_BOUND_S,
                    "the instance to reconnect to the new primary",
                )
            recovered_s = time.monotonic() - killed_at
            assert sentinel_redis.primary_port() == sentinel_redis.replica.port

            # Admin changes through either instance reach the other.
            assert admin(a, "/admin/nodes/bj/drain", "POST")[0] == 200
            wait_until(lambda: routed_to(b) == "sh", PROPAGATION_S, "a's drain to reach b")
            assert admin(b, "/admin/nodes/bj/enable", "POST")[0] == 200
            wait_until(lambda: routed_to(a) == "bj", PROPAGATION_S, "b's enable to reach a")

            # Probe verdicts are shared again: one prober, elected on the new primary, and
            # the instance that does not probe follows its verdict.
            new_primary = sentinel_redis.data_client(sentinel_redis.replica.port)
            try:
                wait_until(
                    lambda: prober_lock_owner(new_primary) is not None, 10, "a prober elected"
                )
                owner = prober_lock_owner(new_primary)
            finally:
                new_primary.close()
            assert owner is not None
            follower = b if str(a.process.pid) in owner else a
            nodes["bj"].health_status = 503
            wait_until(
                lambda: routed_to(follower) == "sh", PROPAGATION_S, "the shared down verdict"
            )
            served = load.outcomes.total()
            wait_until(lambda: load.outcomes.total() >= served + 50, 10, "the load to go on")

        assert set(load.outcomes) == {"302"}, load.outcomes
        assert recovered_s < FAILOVER_BOUND_S
        print(
            f"ready on the new primary {recovered_s:.1f} s after the kill; "
            f"{load.outcomes.total()} requests, all 302"
        )
        for gateway in (a, b):
            log = gateway.log.read_text()
            assert "Traceback" not in log
            assert "redis reachable again" in log
    finally:
        for gateway in (a, b):
            gateway.stop()
