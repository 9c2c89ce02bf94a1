"""Command line: ``mirror-gateway serve | check-config | explain | nodes | node``. The only place
that exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import uvloop

from gateway.config import (
    ADMIN_TOKEN_ENV_VAR,
    CONFIG_ENV_VAR,
    ConfigError,
    GatewayConfig,
    load_config,
    resolve_config_path,
)
from gateway.explain import route_report
from gateway.geo.clientip import ClientAddress, parse_ip
from gateway.geo.locator import GeoDataError
from gateway.hf.paths import PathError, parse_resolve_path
from gateway.logs import configure_logging
from gateway.node.cli import add_node_commands, run_node
from gateway.preflight import PreflightError, check_listeners, check_resources
from gateway.web.admin import ACTIONS
from gateway.web.server import build_router, serve
from gateway.workers import WORKER_FLAG, Supervisor

log = logging.getLogger("gateway")

EXIT_BAD_CONFIG = 2
EXIT_BAD_INPUT = 3
EXIT_ADMIN_FAILED = 4


class AdminCallError(Exception):
    """The admin API could not be reached or refused the call."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror-gateway", description="Geo-aware mirror routing gateway for HF downloads."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    config_help = f"YAML config file (default: ${CONFIG_ENV_VAR}, else embedded defaults)"

    serve_cmd = commands.add_parser("serve", help="serve redirects")
    serve_cmd.add_argument("--config", help=config_help)
    serve_cmd.add_argument("--host", help="listen address (overrides server.host)")
    serve_cmd.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve_cmd.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    serve_cmd.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes sharing the port with SO_REUSEPORT (default: number of CPUs)",
    )
    serve_cmd.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)

    check_cmd = commands.add_parser("check-config", help="validate a config file and exit")
    check_cmd.add_argument("--config", help=config_help)

    explain_cmd = commands.add_parser("explain", help="show the routing decision for a client")
    explain_cmd.add_argument("--config", help=config_help)
    explain_cmd.add_argument("--ip", required=True, help="client IP address")
    explain_cmd.add_argument(
        "--cdn-country", help="country a trusted CDN header would report (ISO alpha-2)"
    )
    explain_cmd.add_argument("url", help="resolve URL or path, e.g. /gpt2/resolve/main/config.json")

    nodes_cmd = commands.add_parser("nodes", help="list or change nodes of a running gateway")
    nodes_cmd.add_argument("action", choices=["list", *ACTIONS])
    nodes_cmd.add_argument("node", nargs="?", help="node id (for drain, disable, enable)")
    nodes_cmd.add_argument(
        "--gateway", default="http://127.0.0.1:8080", help="gateway base URL (admin API)"
    )
    nodes_cmd.add_argument("--token", help=f"admin token (default: ${ADMIN_TOKEN_ENV_VAR})")
    nodes_cmd.add_argument("--json", action="store_true", help="print the API's JSON")
    add_node_commands(commands)
    return parser


def _load(config_flag: str | None) -> GatewayConfig:
    return load_config(resolve_config_path(config_flag))


def _check_config(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    config = load_config(path)
    for warning in check_resources(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path or 'embedded defaults'}: OK ({len(config.nodes)} nodes)")
    return 0


def _explain(args: argparse.Namespace) -> int:
    ip = parse_ip(args.ip)
    if ip is None:
        print(f"--ip: {args.ip!r} is not an IP address", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = _load(args.config)
    router, _ = build_router(config)
    raw_path = urlsplit(args.url).path or "/"
    try:
        ref = parse_resolve_path(raw_path, config.server.max_path_bytes)
    except PathError as exc:
        print(f"url: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if ref is None:
        print(f"url: {raw_path!r} is not a resolve URL", file=sys.stderr)
        return EXIT_BAD_INPUT
    cdn_country = args.cdn_country.upper() if args.cdn_country else None
    client = ClientAddress(ip=ip, source="peer", cdn_country=cdn_country)
    route = router.route(ref, router.placement(client), explain=True)
    report = route_report(route, router.config.routing)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    router.locator.close()
    return 0


def _admin_call(args: argparse.Namespace, path: str, method: str) -> dict[str, Any]:
    token = args.token or os.environ.get(ADMIN_TOKEN_ENV_VAR)
    if not token:
        raise AdminCallError(f"no admin token: pass --token or set {ADMIN_TOKEN_ENV_VAR}")
    request = urllib.request.Request(
        args.gateway.rstrip("/") + path,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("message", exc.reason)
        except ValueError:
            message = exc.reason
        raise AdminCallError(f"{args.gateway}: {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminCallError(f"{args.gateway}: cannot reach the gateway: {exc}") from None


def _node_line(node: dict[str, Any]) -> str:
    latency = "-" if node["latency_ms"] is None else f"{node['latency_ms']:.1f}ms"
    load = "-" if node["load"] is None else f"{node['load']:.0%}"
    state = "up" if node["up"] else "DOWN"
    return (
        f"{node['id']:<24} {state:<5} {node['admin']:<9} {latency:>9} {load:>6}  "
        f"{node['down_reason']}"
    )


def _nodes(args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            result = _admin_call(args, "/admin/nodes", "GET")
            lines = [_node_line(n) for n in result["nodes"]]
            if result["degraded"]:
                lines.append(f"degraded: {result['degraded']}")
        else:
            if not args.node:
                print(f"nodes {args.action}: name the node", file=sys.stderr)
                return EXIT_BAD_INPUT
            path = f"/admin/nodes/{urllib.parse.quote(args.node, safe='')}/{args.action}"
            result = _admin_call(args, path, "POST")
            lines = [_node_line(result)]
    except AdminCallError as exc:
        print(exc, file=sys.stderr)
        return EXIT_ADMIN_FAILED
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.workers < 1:
        print(f"--workers: {args.workers} is not allowed; allowed: 1 or more", file=sys.stderr)
        return EXIT_BAD_INPUT
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    if not args.as_worker:
        # The supervisor's workers share the port: only the first process may test it.
        check_listeners(config, host, port)
    listener = configure_logging(args.log_level, config.logging.format)
    try:
        if args.workers > 1 and not args.as_worker:
            # What every worker opens, opened once here: a worker that cannot start must not
            # be started again and again.
            check_resources(config)
            if not config.redis.enabled:
                log.warning(
                    "%d workers without redis.url or redis.sentinel: each worker keeps its own "
                    "node state, probes for itself and takes admin changes alone; set one",
                    args.workers,
                )
            worker_argv = [
                "serve", "--host", host, "--port", str(port), "--log-level", args.log_level,
                "--workers", "1",
                *(["--config", path] if (path := resolve_config_path(args.config)) else []),
            ]  # fmt: skip
            return Supervisor(worker_argv, args.workers, drain_s=config.server.drain_s).run()
        router, warnings = build_router(config)
        for warning in warnings:
            log.warning("%s", warning)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(
                serve(
                    router,
                    lambda: _load(args.config),
                    host=host,
                    port=port,
                    shared_port=args.as_worker,
                )
            )
    finally:
        listener.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "serve": _serve,
        "check-config": _check_config,
        "explain": _explain,
        "nodes": _nodes,
        "node": run_node,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except GeoDataError as exc:
        print(f"GeoIP error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except PreflightError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
