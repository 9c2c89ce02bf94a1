"""The HTTP layer: aiohttp handlers, the fast path for plain redirects, serving and reloads.

Handlers stay thin: they parse, ask ``plan`` (catalog + router) for the answer, and write it.
"""
