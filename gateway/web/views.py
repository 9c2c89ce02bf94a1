"""Pages for people beside the redirects: ``/explain/{resolve path}``.

Explain plans a resolve request exactly as the redirect handler does and shows why it goes where
it goes, as JSON (the default) or as an HTML page. Operators holding the admin token may ask on
behalf of another client (``?ip=``, ``?country=`` for a CDN country); nobody else may, since the
answer would show how the gateway treats addresses they do not have.
"""

from __future__ import annotations

from aiohttp import web

from gateway.explain import explain_request, render_html
from gateway.geo.clientip import ClientAddress, parse_ip
from gateway.hf.catalog import CatalogError
from gateway.routing.router import PRIVATE_CACHE_CONTROL, Router
from gateway.runtime import RUNTIME
from gateway.web.admin import authorized_or_counted, too_many_failures
from gateway.web.answers import catalog_error, json_error
from gateway.web.handlers import forwarding_headers, parsed_or_error, read_only
from gateway.web.metalink import preferred_type

EXPLAIN_PREFIX = "/explain"
#: JSON wins a tie: ``*/*`` (curl, scripts) gets data, a browser gets the page.
_FORMATS = ("application/json", "text/html")
_HTML_HEADERS = {
    "Cache-Control": PRIVATE_CACHE_CONTROL,
    # The page has neither scripts nor outside resources; should escaping ever fail, nothing runs.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


class _Refused(Exception):
    """A request explain will not answer; carries the JSON error to send."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


def _wants_html(request: web.Request) -> bool:
    chosen = request.query.get("format")
    if chosen is None:
        return preferred_type(request.headers.get("Accept"), _FORMATS) == "text/html"
    if chosen not in ("json", "html"):
        raise _Refused(
            json_error(
                400, "bad_format", f"format {chosen[:20]!r} is not allowed; allowed: json, html"
            )
        )
    return chosen == "html"


def _client(request: web.Request, router: Router) -> tuple[ClientAddress, bool]:
    """The client to explain for, and whether an operator chose it."""
    client = router.resolver.resolve(
        request.remote, forwarding_headers(request.headers, router.config.client_ip)
    )
    ip_text, country = request.query.get("ip"), request.query.get("country")
    if ip_text is None and country is None:
        return client, False
    token = router.config.admin.token
    if token is None:
        raise _Refused(
            json_error(
                403,
                "override_refused",
                "?ip and ?country need the admin API, which is off (admin.token unset)",
            )
        )
    if (limited := too_many_failures(request)) is not None:
        raise _Refused(limited)
    if not authorized_or_counted(request, token):
        raise _Refused(
            json_error(
                403,
                "admin_token_required",
                "?ip and ?country need Authorization: Bearer <admin token>",
            )
        )
    ip = client.ip if ip_text is None else parse_ip(ip_text)
    if ip is None:
        raise _Refused(
            json_error(400, "bad_ip", f"ip {(ip_text or '')[:60]!r} is not an IP address")
        )
    if country is not None and not (len(country) == 2 and country.isascii() and country.isalpha()):
        raise _Refused(
            json_error(400, "bad_country", f"country {country[:20]!r} is not a 2-letter ISO code")
        )
    return ClientAddress(ip, "peer", country.upper() if country else None), True


def _not_a_resolve_path(raw_path: str) -> str:
    return "explain takes a resolve path: /explain/{repo_id}/resolve/{revision}/{filename}"


async def explain(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    router = runtime.router
    raw_path = request.rel_url.raw_path.removeprefix(EXPLAIN_PREFIX)
    ref = parsed_or_error(raw_path, router.config.server.max_path_bytes, _not_a_resolve_path)
    if isinstance(ref, web.Response):
        return ref
    try:
        as_html = _wants_html(request)
        client, override = _client(request, router)
    except _Refused as exc:
        return exc.response
    try:
        report = await explain_request(runtime, ref, client, override=override)
    except CatalogError as exc:
        return catalog_error(exc)
    if as_html:
        return web.Response(
            text=render_html(report), content_type="text/html", headers=_HTML_HEADERS
        )
    return web.json_response(report, headers={"Cache-Control": PRIVATE_CACHE_CONTROL})


def add_view_routes(app: web.Application) -> None:
    # [\s\S] as in the catch-all: a decoded %0A must reach the handler and get a JSON 400.
    app.router.add_route("*", EXPLAIN_PREFIX + r"/{tail:[\s\S]*}", read_only(explain))
