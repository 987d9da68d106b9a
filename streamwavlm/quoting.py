"""How an error message quotes a value it was given: the value's ``repr``, cut short.

A refusal repeats what was wrong so that the sender can see the mistake; a value of a megabyte (a WebSocket
hello, a field of a checkpoint's config) must not become a megabyte log line, stderr line or error reply.
"""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length noted."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
