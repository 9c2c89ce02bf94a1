"""Real download clients, run the way users run them, against a gateway or a fake hub.

- ``run_client`` / ``run_calls``: ``huggingface_hub`` 2.x (this venv), 1.33 (``.venv-hf1``) and
  0.36 (``.venv-hf0``) in a subprocess each, with ``HF_ENDPOINT`` pointed at the server under
  test and a private ``HF_HOME``. scripts/test creates the extra venvs; a missing one is an
  error (tests fail, never skip), and so is a venv with another version than pinned here.
- ``curl_download`` / ``wget_download``: the command-line tools, following redirects.

``HF_HUB_DISABLE_XET`` is deliberately NOT set and ``hf_xet`` is installed in every venv: the
gateway itself must keep clients off Xet.

Extra request headers (``X-Forwarded-For`` ...) go through the ``headers=`` argument, which
``hf_hub_download``, ``snapshot_download`` and ``HfApi`` take in all three versions; the clients
send them on every request of the call, the metadata HEAD and the download GET alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).parent.parent

ClientName = Literal["hf2", "hf1", "hf0"]
CallKind = Literal[
    "hf_hub_download", "snapshot_download", "list_repo_tree", "repo_info", "get_paths_info"
]

#: Each client's interpreter. hf2 is the interpreter running the tests.
CLIENTS: dict[str, Path] = {
    "hf2": Path(sys.executable),
    "hf1": REPO / ".venv-hf1" / "bin" / "python",
    "hf0": REPO / ".venv-hf0" / "bin" / "python",
}
#: The ``huggingface_hub`` version each client must have (a prefix for hf2, whose exact version
#: comes from the test extras).
VERSIONS: dict[str, str] = {"hf2": "2.", "hf1": "1.33.0", "hf0": "0.36.2"}
ALL_CLIENTS: tuple[ClientName, ...] = ("hf2", "hf1", "hf0")

_MARKER = "@@HF-CLIENT-RESULT@@"


class ClientMissingError(RuntimeError):
    """A client venv is absent or holds the wrong version: run scripts/test to (re)create it."""


def client_python(client: str) -> Path:
    try:
        python = CLIENTS[client]
    except KeyError:
        raise ValueError(f"unknown client {client!r}; known: {sorted(CLIENTS)}") from None
    if not os.access(python, os.X_OK):
        raise ClientMissingError(
            f"{client}: {python} does not exist. Run scripts/test once: it creates .venv-hf1 "
            "(huggingface_hub==1.33.0) and .venv-hf0 (huggingface_hub==0.36.2)."
        )
    return python


# The program each client runs: reads a JSON list of calls on stdin and prints one result per
# call after a marker line. Kept compatible with Python 3.8+ and all three client versions.
_SNIPPET = r"""
import hashlib, json, os, sys
import huggingface_hub as hf

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

def entry(item):
    if hasattr(item, "tree_id"):
        return {"type": "directory", "path": item.path, "oid": item.tree_id}
    lfs = item.lfs
    return {
        "type": "file", "path": item.path, "size": item.size, "oid": item.blob_id,
        "lfs": {"sha256": lfs["sha256"], "size": lfs["size"]} if lfs else None,
        "xet_hash": getattr(item, "xet_hash", None),
    }

def api(kwargs):
    return hf.HfApi(headers=kwargs.pop("headers", None), token=kwargs.pop("token", None))

def run(kind, kwargs):
    out = {"kind": kind, "ok": True}
    if kind == "hf_hub_download":
        path = hf.hf_hub_download(**kwargs)
        out.update(path=path, files={kwargs["filename"]: sha256(path)})
    elif kind == "snapshot_download":
        folder = hf.snapshot_download(**kwargs)
        files = {}
        for root, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if d != ".cache"]  # local_dir bookkeeping
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, folder).replace(os.sep, "/")] = sha256(path)
        out.update(path=folder, files=files)
    elif kind == "list_repo_tree":
        out["entries"] = [entry(e) for e in api(kwargs).list_repo_tree(**kwargs)]
    elif kind == "get_paths_info":
        out["entries"] = [entry(e) for e in api(kwargs).get_paths_info(**kwargs)]
    elif kind == "repo_info":
        info = api(kwargs).repo_info(**kwargs)
        out.update(
            sha=info.sha, private=info.private, gated=getattr(info, "gated", None),
            siblings=[s.rfilename for s in (info.siblings or [])],
        )
    else:
        raise ValueError("unknown call kind " + kind)
    return out

results = []
for call in json.load(sys.stdin):
    try:
        result = run(call["kind"], dict(call["kwargs"]))
    except Exception as error:
        response = getattr(error, "response", None)
        result = {"kind": call["kind"], "ok": False, "error": {
            "type": type(error).__name__,
            "mro": [c.__name__ for c in type(error).__mro__],
            "message": str(error),
            "status": getattr(response, "status_code", None),
            "cause": repr(error.__cause__) if error.__cause__ else None,
        }}
    result["version"] = hf.__version__
    results.append(result)
print("@@HF-CLIENT-RESULT@@" + json.dumps(results))
"""


def client_env(
    endpoint: str, hf_home: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a client: ours, minus anything HF- or proxy-related, plus the endpoint.

    Inherited ``HF_*`` variables (a token, offline mode, ``HF_HUB_DISABLE_XET``, a cache dir)
    would change what the client does; a proxy would take loopback traffic elsewhere.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("HF_", "HUGGING", "PYTHONPATH"))
        and not k.lower().endswith("_proxy")
    }
    env.update(
        {
            "HF_ENDPOINT": endpoint.rstrip("/"),
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "10",
            "HF_HUB_DOWNLOAD_TIMEOUT": "30",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
    )
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Call:
    """One client call: ``kind`` names the function, ``kwargs`` are passed to it as they are."""

    kind: CallKind
    kwargs: Mapping[str, Any]


def run_calls(
    client: str,
    endpoint: str,
    calls: Sequence[Call],
    *,
    hf_home: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """Run several calls in ONE client process (in order, sharing its cache): faster than one
    process per call. Returns one result per call, as ``run_client`` describes."""
    python = client_python(client)
    hf_home.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([{"kind": c.kind, "kwargs": dict(c.kwargs)} for c in calls])
    try:
        proc = subprocess.run(
            [str(python), "-c", _SNIPPET],
            input=payload,
            capture_output=True,
            text=True,
            env=client_env(endpoint, hf_home, env),
            cwd=hf_home,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise AssertionError(
            f"{client} did not finish {[c.kind for c in calls]} in {timeout} s; "
            f"stderr:\n{_text(error.stderr)[-4000:]}"
        ) from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    if proc.returncode != 0 or not lines:
        hint = ""
        if "No module named 'huggingface_hub'" in proc.stderr:
            hint = " (huggingface_hub is not installed for it: run scripts/test)"
        raise ClientMissingError(
            f"{client} ({python}) exited {proc.returncode}{hint}; stderr:\n{proc.stderr[-4000:]}"
        )
    results: list[dict[str, Any]] = json.loads(lines[-1][len(_MARKER) :])
    for result in results:
        if not str(result["version"]).startswith(VERSIONS[client]):
            raise ClientMissingError(
                f"{client} runs huggingface_hub {result['version']}, expected {VERSIONS[client]}: "
                "run scripts/test to reinstall it"
            )
        result["client"] = client
        result["stderr"] = proc.stderr[-4000:]
    return results


def run_client(
    client: str,
    endpoint: str,
    script_kind: CallKind,
    *,
    hf_home: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run one ``huggingface_hub`` call in a ``client`` subprocess against ``endpoint``.

    ``script_kind`` is the function: ``hf_hub_download``, ``snapshot_download`` (``kwargs``
    go to it unchanged: ``repo_id``, ``filename``, ``revision``, ``repo_type``, ``headers``,
    ``token``, ``local_dir``, ``force_download`` ...), or the ``HfApi`` methods
    ``list_repo_tree``, ``get_paths_info``, ``repo_info`` (``headers`` and ``token`` go to
    ``HfApi``). Reuse ``hf_home`` across calls to test the client cache.

    Returns a JSON-able dict: ``ok``; ``version`` (of huggingface_hub); ``client``; for
    downloads ``path`` (the file, or the snapshot folder) and ``files`` (``{path in repo:
    sha256}`` of what landed on disk); ``entries`` for listings; ``sha`` / ``siblings`` for
    ``repo_info``; on an exception ``error`` = ``{type, mro, message, status, cause}`` (match
    on ``mro`` to accept a class or its parents: 0.36 raises ``EntryNotFoundError`` where 1.x
    and 2.x raise ``RemoteEntryNotFoundError``); and ``stderr`` (the client's log tail).
    """
    call = Call(script_kind, kwargs)
    return run_calls(client, endpoint, [call], hf_home=hf_home, env=env, timeout=timeout)[0]


def expect_ok(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """``result`` itself, after failing the test with the client's error and log if it failed."""
    if not result["ok"]:
        raise AssertionError(
            f"{result.get('client')} {result['kind']} failed: {result['error']}\n"
            f"client stderr:\n{result.get('stderr', '')}"
        )
    return result


def error_type(result: Mapping[str, Any]) -> str:
    """The exception class name of a failed call (fails the test if the call succeeded)."""
    if result["ok"]:
        raise AssertionError(f"{result.get('client')} {result['kind']} unexpectedly succeeded")
    return str(result["error"]["type"])


#: The class each client version raises for a file missing from a repo.
ENTRY_NOT_FOUND: dict[str, str] = {
    "hf2": "RemoteEntryNotFoundError",
    "hf1": "RemoteEntryNotFoundError",
    "hf0": "EntryNotFoundError",
}


# --------------------------------------------------------------------------- curl and wget


@dataclass(frozen=True)
class ToolResult:
    """What a command-line download did: the last answer's status and headers, every answer's
    status line in order (redirects included), and what landed in ``out``."""

    returncode: int
    status: int | None
    headers: dict[str, str]
    statuses: list[int]
    out: Path
    stderr: str

    @property
    def body(self) -> bytes:
        return self.out.read_bytes() if self.out.exists() else b""


def _tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "*"
    return env


def _parse_header_blocks(text: str) -> list[tuple[int, dict[str, str]]]:
    """HTTP answers as dumped by ``curl -D`` or ``wget -S``: [(status, lower-cased headers)]."""
    blocks: list[tuple[int, dict[str, str]]] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.startswith("HTTP/"):
            parts = line.split()
            blocks.append((int(parts[1]) if len(parts) > 1 else 0, {}))
        elif blocks and ":" in line:
            name, _, value = line.partition(":")
            blocks[-1][1][name.strip().lower()] = value.strip()
    return blocks


def curl_download(
    url: str,
    out: Path,
    headers: Mapping[str, str] | None = None,
    *,
    resume: bool = False,
    method: str | None = None,
    timeout: float = 60.0,
) -> ToolResult:
    """``curl -L`` ``url`` into ``out``. ``resume``: ``-C -`` (continue a partial ``out``)."""
    dump = out.with_name(out.name + ".headers")
    args = ["curl", "-sS", "-L", "--noproxy", "*", "--max-time", str(timeout), "-D", str(dump)]
    args += ["-o", str(out)]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    if resume:
        args += ["-C", "-"]
    if method:
        args += ["-X", method] if method != "HEAD" else ["-I"]
    proc = subprocess.run(
        [*args, url],
        capture_output=True,
        text=True,
        env=_tool_env(),
        timeout=timeout + 10,
        check=False,
    )
    blocks = _parse_header_blocks(dump.read_text("latin-1") if dump.exists() else "")
    status, last = blocks[-1] if blocks else (None, {})
    return ToolResult(proc.returncode, status, last, [s for s, _ in blocks], out, proc.stderr)


def wget_download(
    url: str,
    out: Path,
    headers: Mapping[str, str] | None = None,
    *,
    resume: bool = False,
    timeout: float = 60.0,
) -> ToolResult:
    """``wget`` ``url`` into ``out`` (wget follows redirects). ``resume``: ``--continue``."""
    args = ["wget", "-S", "--no-proxy", "--tries=1", f"--timeout={timeout}", "-O", str(out)]
    args += ["--no-config"]
    for name, value in (headers or {}).items():
        args += [f"--header={name}: {value}"]
    if resume:
        args += ["--continue"]
    proc = subprocess.run(
        [*args, url],
        capture_output=True,
        text=True,
        env=_tool_env(),
        timeout=timeout + 10,
        check=False,
    )
    # wget -S writes the answers' headers to stderr, indented, among its own messages.
    blocks = _parse_header_blocks(
        "\n".join(line for line in proc.stderr.splitlines() if line.startswith("  "))
    )
    status, last = blocks[-1] if blocks else (None, {})
    return ToolResult(proc.returncode, status, last, [s for s, _ in blocks], out, proc.stderr)


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
