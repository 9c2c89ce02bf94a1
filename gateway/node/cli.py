"""``mirror-gateway node sync | verify | manifest``: the node side's commands.

Exit codes: 0 done; 1 something failed (a revision not synced, damage found by verify, the
node directory not writable);
2 a bad config; 3 a bad argument; 5 the node directory holds records that cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import get_args

from gateway.config import ConfigError, _http_url
from gateway.hf.paths import RepoType
from gateway.logs import configure_logging
from gateway.node.manifest import write_manifest
from gateway.node.progress import Progress, Silent, TerminalBar
from gateway.node.settings import (
    NODE_CONFIG_ENV_VAR,
    NodeSettings,
    _read_token,
    finish,
    load_node_settings,
    parse_repo_arg,
)
from gateway.node.store import NodeTree, StoreError
from gateway.node.sync import Syncer, SyncReport
from gateway.node.upstream import Upstream, new_session
from gateway.node.verify import Verifier

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_BAD_INPUT = 3
EXIT_BAD_STORE = 5

_log = logging.getLogger("gateway.node")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class BadArgument(Exception):
    """A command-line value that cannot be used; the message names the option."""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``1d`` -> seconds (> 0)."""
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise BadArgument(f"--every: {text!r} is not a duration; e.g. 24h, 30m, 3600s, 1d")
    return seconds


def add_node_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = commands.add_parser("node", help="run a mirror node: sync, verify, manifest")
    actions = node.add_subparsers(dest="node_command", required=True)

    sync = actions.add_parser("sync", help="mirror repositories from upstream into --root")
    sync.add_argument("--config", help=f"node YAML config (default: ${NODE_CONFIG_ENV_VAR})")
    sync.add_argument("--root", help="directory the web server serves (overrides root)")
    sync.add_argument("--upstream", help="HF-compatible upstream URL (overrides upstream)")
    sync.add_argument(
        "--repo-type", choices=get_args(RepoType), default="model", help="type of REPO arguments"
    )
    sync.add_argument("--token-file", help="file holding the upstream token (gated repos)")
    sync.add_argument("--node-id", help="the node's id in the gateway config (overrides node_id)")
    sync.add_argument("repos", nargs="*", metavar="REPO[@REVISION]", help="instead of repos")
    when = sync.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="one run, then exit (cron, timers)")
    when.add_argument("--every", metavar="DURATION", help="keep running, a run every 24h, 30m...")

    verify = actions.add_parser("verify", help="re-hash published files, quarantine bad ones")
    verify.add_argument("--root", required=True, help="the node directory")
    verify.add_argument(
        "--share", type=float, default=1.0, help="fraction of the files to check (default 1)"
    )

    manifest = actions.add_parser("manifest", help="rebuild manifest.json from what is on disk")
    manifest.add_argument("--root", required=True, help="the node directory")


def _settings(args: argparse.Namespace) -> NodeSettings:
    settings = load_node_settings(args.config or os.environ.get(NODE_CONFIG_ENV_VAR))
    if args.root:
        settings = replace(settings, root=Path(args.root))
    if args.upstream:
        settings = replace(settings, upstream=_http_url(args.upstream, "--upstream"))
    if args.token_file:
        settings = replace(settings, token=_read_token(Path(args.token_file), "--token-file"))
    if args.node_id:
        settings = replace(settings, node_id=args.node_id)
    if args.repos:
        repos = tuple(parse_repo_arg(text, args.repo_type) for text in args.repos)
        settings = replace(settings, repos=repos)
    if not settings.repos:
        raise ConfigError("repos: name at least one repository (in the config or as REPO)")
    return finish(settings)


def _log_report(report: SyncReport, elapsed_s: float, requests: dict[str, int]) -> None:
    asked = ", ".join(f"{kind} {count}" for kind, count in sorted(requests.items())) or "none"
    _log.info(
        "sync done in %.1f s: %d published, %d failed, %d retired, %d removed; "
        "%d files downloaded, %d reused; upstream requests: %s",
        elapsed_s,
        len(report.published),
        len(report.failed),
        len(report.retired),
        len(report.removed),
        report.downloaded,
        report.reused,
        asked,
    )


async def _sync_once(settings: NodeSettings, progress: Progress) -> SyncReport:
    async with new_session(settings.timeout_s) as session:
        upstream = Upstream(session, settings.upstream, settings.token)
        started = time.monotonic()
        report = await Syncer(settings, upstream, progress=progress).run()
        _log_report(report, time.monotonic() - started, upstream.requests)
        return report


async def _sync_every(settings: NodeSettings, period_s: float, progress: Progress) -> None:
    loop = asyncio.get_running_loop()
    next_run = loop.time()
    while True:
        await _sync_once(settings, progress)
        next_run = max(next_run + period_s, loop.time())
        await asyncio.sleep(next_run - loop.time())


def _sync(args: argparse.Namespace) -> int:
    period = parse_duration(args.every) if args.every else None
    settings = _settings(args)
    progress: Progress = TerminalBar() if sys.stderr.isatty() else Silent()
    if period is not None:
        asyncio.run(_sync_every(settings, period, progress))
        return 0
    report = asyncio.run(_sync_once(settings, progress))
    return EXIT_FAILED if report.failed else 0


def _verify(args: argparse.Namespace) -> int:
    if not 0 < args.share <= 1:
        raise BadArgument(f"--share: {args.share} is not allowed; allowed: above 0, at most 1")
    report = Verifier(NodeTree(Path(args.root))).run(args.share)
    for damage in report.damaged:
        _log.error("damaged: %s", damage)
    _log.info(
        "verify: %d of %d files checked, %d damaged, %d quarantined",
        report.checked,
        report.total,
        len(report.damaged),
        len(report.quarantined),
    )
    return EXIT_FAILED if report.damaged else 0


def _manifest(args: argparse.Namespace) -> int:
    tree = NodeTree(Path(args.root))
    node_id = tree.read_node_id()
    if node_id is None:
        raise StoreError(f"{tree.root}: no node here yet (run `node sync` first)")
    document = write_manifest(tree, node_id)
    commits = sum(len(repo["commits"]) for repo in document["repos"])
    _log.info("manifest: %d commits of %d repositories", commits, len(document["repos"]))
    return 0


def run_node(args: argparse.Namespace) -> int:
    """Run a ``node`` command; the caller turns ConfigError into its exit code."""
    root = logging.getLogger()
    # Put back as found: main() may be called in-process (tests, a wrapper) and go on logging.
    handlers, level = root.handlers[:], root.level
    listener = configure_logging("INFO", "text" if sys.stderr.isatty() else "json")
    commands = {"sync": _sync, "verify": _verify, "manifest": _manifest}
    try:
        return commands[args.node_command](args)
    except BadArgument as exc:
        _log.error("%s", exc)
        return EXIT_BAD_INPUT
    except StoreError as exc:
        _log.error("%s", exc)
        return EXIT_BAD_STORE
    except ConfigError as exc:
        _log.error("config error: %s", exc)
        return EXIT_BAD_CONFIG
    except OSError as exc:  # the node directory: permissions, a full disk
        _log.error("%s", exc)
        return EXIT_FAILED
    finally:
        listener.stop()
        root.handlers[:] = handlers
        root.setLevel(level)
