"""Everything a request may read, built once per process and reloaded in place."""

from __future__ import annotations

from aiohttp import web

from gateway.catalog import Catalog
from gateway.probe import Prober
from gateway.router import Router
from gateway.store import StateStore
from gateway.sync import SyncTracker
from gateway.upstream import UpstreamProxy


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
    ) -> None:
        self.router = router
        self.store = store
        self.prober = prober
        self.catalog = catalog
        self.sync = sync
        self.proxy = proxy

    def adopt(self, router: Router) -> None:
        self.router = router
        self.store.reconfigure(router.config.nodes)
        if self.prober is not None:
            self.prober.reconfigure(router.config.nodes, router.config.probing)
        self.sync.reconfigure(router.config.nodes, router.config.sync)


RUNTIME = web.AppKey("runtime", Runtime)
