"""Client text made safe to repeat: what a client sent never comes back in an answer or a log
line with its credentials in it.

The parser's messages quote the bytes they choke on; an over-long ``Authorization`` line would be
quoted with its token. So quoted excerpts go altogether, and what is left loses anything that
looks like a credential: header lines that carry one, auth schemes with their value, Hugging Face
tokens, JWTs and other long random-looking strings.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

_QUOTED = re.compile(r"""b?'(?:[^'\\]|\\.)*'?|b?"(?:[^"\\]|\\.)*"?""")
_CREDENTIAL = re.compile(
    r"(?:proxy-)?authorization\s*[:=].*|(?:set-)?cookie\s*[:=].*"
    r"|\b(?:bearer|basic|digest|negotiate|token)\s+\S+"
    r"|\bhf_\w+|\beyJ[\w-]*(?:\.[\w-]*)*"
    r"|[A-Za-z0-9+/_=-]{24,}",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` (one line of it) without quoted excerpts or credential-looking values."""
    line = text.strip().split("\n", 1)[0]
    line = _QUOTED.sub(REDACTED, line)
    return _CREDENTIAL.sub(REDACTED, line)
