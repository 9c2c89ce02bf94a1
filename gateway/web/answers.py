"""JSON error answers, shaped as Hugging Face clients understand them.

Clients tell errors apart by ``X-Error-Code``, not by status alone.
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway.hf.catalog import CatalogError

JSON_CONTENT_TYPE = "application/json"


def _header_safe(text: str) -> str:
    flat = " ".join(text.split())
    return flat.encode("ascii", "backslashreplace").decode("ascii")[:300]


def json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": code, "message": message}),
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def catalog_error(exc: CatalogError) -> web.Response:
    headers = {"X-Error-Message": _header_safe(exc.message), "Cache-Control": "no-store"}
    if exc.error_code is not None:
        headers["X-Error-Code"] = exc.error_code
    if exc.commit is not None:
        headers["X-Repo-Commit"] = exc.commit
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    code = exc.error_code or ("upstream_timeout" if exc.status == 504 else "upstream_unavailable")
    return json_error(exc.status, code, exc.message, headers)
