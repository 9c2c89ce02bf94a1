"""Logging: JSON lines written by a background thread, and request ids.

Records go through a queue to a listener thread, so a slow stderr (a pipe to a log shipper,
a full disk) never stalls the event loop. Every record is one JSON object; the access log adds
the request's fields. Nothing here ever receives a token: handlers pass only the fields below.
"""

from __future__ import annotations

import itertools
import json
import logging
import logging.handlers
import queue
import secrets
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]

ACCESS_LOGGER = "gateway.access"
#: The attribute under which a record carries its structured fields.
FIELDS_ATTR = "fields"

_REQUEST_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")
_REQUEST_ID_MAX = 128
#: New ids are this process's random prefix and a counter: unique across processes and restarts
#: without asking the system for randomness on every request.
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)


def request_id(incoming: str | None) -> str:
    """The client's (or proxy's) ``X-Request-ID`` when it is a sane token, else a new one."""
    if incoming and len(incoming) <= _REQUEST_ID_MAX and _REQUEST_ID_CHARS.issuperset(incoming):
        return incoming
    return f"{_ID_PREFIX}-{next(_id_counter):x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: LogFormat) -> logging.handlers.QueueListener:
    """Route all logging through a queue to stderr; the caller stops the listener at exit."""
    output = logging.StreamHandler(sys.stderr)
    output.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level)
    listener = logging.handlers.QueueListener(records, output, respect_handler_level=False)
    listener.start()
    return listener


def log_access(fields: dict[str, Any]) -> None:
    logging.getLogger(ACCESS_LOGGER).info("request", extra={FIELDS_ATTR: fields})
