"""Redirect targets: absolute URLs built only from a configured base and a validated file path.

The template was checked at config load to start with ``{base}/`` and to use only known
placeholders, and every value filled in is percent-encoded by ``FileRef``, so no client input
can move a redirect off the configured node or upstream.
"""

from __future__ import annotations

from gateway.config import DEFAULT_URL_TEMPLATE, NodeConfig
from gateway.hf.paths import FileRef, resolve_path_for


def default_path(ref: FileRef) -> str:
    """What follows the base in the default template: the file's canonical resolve path."""
    return resolve_path_for(ref)


def fill_template(template: str, base: str, ref: FileRef, path: str | None = None) -> str:
    """``template`` filled for ``ref``; ``path``: ``default_path(ref)``, when the caller has it
    (a redirect names one file on several nodes)."""
    if template == DEFAULT_URL_TEMPLATE:
        return base + (default_path(ref) if path is None else path)
    return template.format(
        base=base,
        type_prefix=ref.type_prefix,
        repo_type=ref.repo_type,
        repo=ref.repo_id,
        revision=ref.revision_encoded,
        path=ref.filename_encoded,
    )


def node_url(node: NodeConfig, ref: FileRef, path: str | None = None) -> str:
    return fill_template(node.url_template, node.base_url, ref, path)


def upstream_url(upstream_base: str, ref: FileRef) -> str:
    return fill_template(DEFAULT_URL_TEMPLATE, upstream_base, ref)
