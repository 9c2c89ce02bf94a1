"""Command line: ``mirror-gateway serve | check-config | explain``. The only place that exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

import uvloop

from gateway.clientip import ClientAddress, parse_ip
from gateway.config import (
    CONFIG_ENV_VAR,
    ConfigError,
    GatewayConfig,
    load_config,
    resolve_config_path,
)
from gateway.explain import route_report
from gateway.geo import GeoDataError
from gateway.hfpath import PathError, parse_resolve_path
from gateway.server import build_router, serve

log = logging.getLogger("gateway")

EXIT_BAD_CONFIG = 2
EXIT_BAD_INPUT = 3


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

    check_cmd = commands.add_parser("check-config", help="validate a config file and exit")
    check_cmd.add_argument("--config", help=config_help)

    explain_cmd = commands.add_parser("explain", help="show the routing decision for a client")
    explain_cmd.add_argument("--config", help=config_help)
    explain_cmd.add_argument("--ip", required=True, help="client IP address")
    explain_cmd.add_argument(
        "--cdn-country", help="country a trusted CDN header would report (ISO alpha-2)"
    )
    explain_cmd.add_argument("url", help="resolve URL or path, e.g. /gpt2/resolve/main/config.json")
    return parser


def _load(config_flag: str | None) -> GatewayConfig:
    return load_config(resolve_config_path(config_flag))


def _check_config(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    config = load_config(path)
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
    print(json.dumps(route_report(router.route(ref, client)), indent=2, ensure_ascii=False))
    router.locator.close()
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = _load(args.config)
    router, warnings = build_router(config)
    for warning in warnings:
        log.warning("%s", warning)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config, router, lambda: _load(args.config), host=host, port=port))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"serve": _serve, "check-config": _check_config, "explain": _explain}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except GeoDataError as exc:
        print(f"GeoIP error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
