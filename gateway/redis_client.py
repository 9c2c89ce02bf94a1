"""The one place a Redis client is made: from ``redis.url`` or through Redis Sentinel.

The state store, its pub/sub and the catalog all take their client from ``open_redis``, so a
Sentinel-managed primary is followed the same way everywhere: each new connection asks the
sentinels where the primary is, and a connection to a primary that died or was demoted fails,
which the callers already treat as "Redis unavailable" (degrade, reconnect, resync).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from gateway.config import RedisConfig, SentinelConfig


class SentinelRedis(Redis):
    """A client of the Sentinel-managed primary that also closes its sentinel connections."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel_manager is not None:
                await self.sentinel_manager.aclose()


def _tls_options(sentinel: SentinelConfig) -> dict[str, Any]:
    if not sentinel.tls:
        return {}
    options: dict[str, Any] = {"ssl": True}
    if sentinel.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(sentinel.tls_ca_file)
    return options


def open_redis(config: RedisConfig, *, health_check_interval: float = 0) -> Redis:
    """A client for the configured Redis; connects lazily, so a Redis that is down delays nothing.

    Commands are not retried inside redis-py: a failure must reach the caller at once, so that it
    degrades and, after reconnecting, resyncs what it may have missed.
    """
    common: dict[str, Any] = {
        # redis-py lets a password in the URL override this one.
        "password": config.password,
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.command_timeout_s,
        "health_check_interval": health_check_interval,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.url is not None:
        return Redis.from_url(config.url, **common)
    sentinel = config.sentinel
    if sentinel is None:
        raise ValueError("neither redis.url nor redis.sentinel is set")
    tls = _tls_options(sentinel)
    manager = Sentinel(
        list(sentinel.addresses),
        sentinel_kwargs={
            "socket_connect_timeout": config.connect_timeout_s,
            "socket_timeout": config.command_timeout_s,
            "password": sentinel.sentinel_password,
            "retry": Retry(NoBackoff(), 0),
            **tls,
        },
    )
    client: SentinelRedis = manager.master_for(
        sentinel.master_name,
        redis_class=SentinelRedis,
        db=sentinel.db,
        **common,
        **tls,
    )
    client.sentinel_manager = manager
    return client
