"""Topic names: ``<prefix>/<stream_id>/<kind>``; the engine's status uses the reserved id ``_engine``.

Stream ids and kinds become single topic levels, so they are checked here once: a ``/`` or a wildcard in
a stream id would silently publish somewhere no subscriber looks.
"""

from __future__ import annotations

from collections.abc import Iterable

_FORBIDDEN = ("/", "+", "#", "\0")


def check_level(value: str, what: str) -> str:
    """Refuse a name that cannot be one MQTT topic level; return it unchanged otherwise."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    bad = [c for c in _FORBIDDEN if c in value]
    if bad:
        raise ValueError(f"{what} {value!r} contains {bad[0]!r}; it must be a single MQTT topic level "
                         "(no '/', '+', '#' or NUL)")
    return value


def check_prefix(prefix: str) -> str:
    """A prefix is one or more levels without wildcards and without a leading or trailing '/'."""
    if not prefix or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"topic prefix {prefix!r} must be non-empty, without a leading or trailing '/'")
    for level in prefix.split("/"):
        check_level(level, f"topic prefix level of {prefix!r}")
    return prefix


def topic(prefix: str, stream_id: str, kind: str) -> str:
    return f"{prefix}/{stream_id}/{kind}"


def filters(prefix: str, stream: str, kinds: Iterable[str]) -> list[str]:
    """Subscription filters for ``stream`` (an id or ``+``) and each kind."""
    check_prefix(prefix)
    if stream != "+":
        check_level(stream, "stream id")
    return [topic(prefix, stream, check_level(k, "kind")) for k in kinds]


def split(prefix: str, name: str) -> tuple[str, str] | None:
    """``(stream_id, kind)`` of a topic under ``prefix``, or None for a topic outside the layout."""
    head = prefix + "/"
    if not name.startswith(head):
        return None
    parts = name[len(head):].split("/")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None
