"""Everything a request may read, built once per process and reloaded in place."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.hf.catalog import Catalog
from gateway.hf.upstream import UpstreamProxy
from gateway.metrics import GatewayMetrics, GatewaySample, NodeSample
from gateway.routing.router import Router
from gateway.state.probe import Prober
from gateway.state.store import StateStore
from gateway.state.sync import SyncTracker

#: Cells scored again between two yields to the event loop: at most a few milliseconds.
RESCORE_SLICE = 32


class Runtime:
    """What requests read: the router in force, live node state, the catalog and node sync.

    A config reload swaps the router in one assignment; the rest lives as long as the process.
    """

    def __init__(
        self,
        router: Router,
        store: StateStore,
        prober: Prober | None,
        catalog: Catalog,
        sync: SyncTracker,
        proxy: UpstreamProxy,
        metrics_dir: str | None = None,
    ) -> None:
        self.router = router
        self.store = store
        self.prober = prober
        self.catalog = catalog
        self.sync = sync
        self.proxy = proxy
        # A registry per runtime: several gateways in one test process must not collide.
        self.metrics = GatewayMetrics(
            self.sample, CollectorRegistry(), multiprocess_dir=metrics_dir
        )
        #: Set when shutdown begins, so load balancers stop sending before the listener closes.
        self.stopping = False

    def adopt(self, router: Router) -> None:
        self.router = router
        # Taken up by the reconfigure below, which computes every status again.
        self.store.live.load_prior = router.config.routing.load_prior
        self.store.reconfigure(router.config.nodes)
        if self.prober is not None:
            self.prober.reconfigure(router.config.nodes, router.config.probing)
        self.sync.reconfigure(router.config.nodes, router.config.sync)

    async def rescore_on_changes(self) -> None:
        """Keep the router's scored candidates current: after each live-state change, score
        the cells in use again, most recently used first, a slice at a time so requests are
        never held up, starting over when the state changes again meanwhile."""
        live = self.store.live
        while True:
            await live.changed.wait()
            live.changed.clear()
            router, version = self.router, live.version
            for count, cell in enumerate(router.stale_cells(version), 1):
                if live.version != version or router is not self.router:
                    break
                router.rescore(cell, live.statuses, version)
                if count % RESCORE_SLICE == 0:
                    await asyncio.sleep(0)

    def sample(self) -> GatewaySample:
        """Live state for the scrape-time metrics collector (never on the request path)."""
        config = self.router.config
        live = self.store.live
        total_capacity = sum(n.capacity.connections or 0 for n in config.nodes)
        now = time.time()
        nodes = []
        for node in config.nodes:
            status = live.statuses.get(node.id)
            probes = live.probe_records(node.id)
            holdings = self.sync.holdings.get(node.id)
            newest_sync = (
                max(
                    (
                        c.synced_at
                        for commits in holdings.commits.values()
                        for c in commits.values()
                    ),
                    default=None,
                )
                if holdings is not None
                else None
            )
            capacity = node.capacity.connections
            nodes.append(
                NodeSample(
                    node_id=node.id,
                    up=status is not None and status.up,
                    admin_mode=live.admin_mode(node.id),
                    probe_latency_s={
                        p.vantage: p.latency_ms / 1000 for p in probes if p.latency_ms is not None
                    },
                    last_ok_at={
                        p.vantage: p.last_ok_at for p in probes if p.last_ok_at is not None
                    },
                    load_ratio=status.load if status is not None else None,
                    capacity_share=capacity / total_capacity
                    if capacity and total_capacity
                    else None,
                    sync_lag_s=now - newest_sync if newest_sync is not None else None,
                )
            )
        degraded = self.store.degraded_reason is not None
        return GatewaySample(
            nodes=tuple(nodes),
            catalog=self.catalog.stats(),
            redis_configured=config.redis.enabled,
            redis_connected=config.redis.enabled and not degraded,
            degraded=degraded,
            geoip_build_time={
                db.role: db.build_time.timestamp() for db in self.router.locator.databases
            },
        )


RUNTIME = web.AppKey("runtime", Runtime)
