"""Requests that carry the user's credentials, and the nodes those may be redirected to.

huggingface_hub and curl drop ``Authorization`` when a redirect changes host; wget (and so
hfd.sh ``--hf_token``) and aria2c send it again to the host the redirect names. A redirect to a
node therefore hands it the user's token. Such a request is routed as any other, but the nodes
its credentials may not reach are excluded, with a reason, through the revision check the rule
already takes: ``credentials.route: upstream`` (the default) excludes every node, so the client
goes upstream; ``own_nodes`` excludes ``third_party`` nodes only.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import CredentialedRoute, NodeConfig, NodeKind
from gateway.routing.router import RevisionCheck

#: Request headers that identify the user to upstream. Hugging Face takes a token in
#: ``Authorization`` from its clients and a session cookie from browsers.
CREDENTIAL_HEADERS = ("Authorization", "Cookie")

_KINDS_TRUSTED: dict[CredentialedRoute, frozenset[NodeKind]] = {
    "upstream": frozenset(),
    "own_nodes": frozenset({"mirror", "cache"}),
}


def carries_credentials(headers: Mapping[str, str]) -> bool:
    """Whether a request (``headers`` case-insensitive, as aiohttp's) carries credentials."""
    return any(name in headers for name in CREDENTIAL_HEADERS)


class CredentialedRevisions:
    """``revisions`` for a request with credentials: nodes they may not reach are excluded."""

    __slots__ = ("_inner", "_route", "_trusted")

    def __init__(self, inner: RevisionCheck, route: CredentialedRoute) -> None:
        self._inner = inner
        self._route = route
        self._trusted = _KINDS_TRUSTED[route]

    def reason(self, node: NodeConfig) -> str | None:
        if node.kind not in self._trusted:
            return (
                f"the request carries credentials, which a {node.kind} node may not receive "
                f"(credentials.route: {self._route})"
            )
        return self._inner.reason(node)

    def revision_for(self, node_id: str) -> str | None:
        return self._inner.revision_for(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._inner
