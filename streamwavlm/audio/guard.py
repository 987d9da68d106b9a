"""Who may open a network audio stream, and how many: the WebSocket server's admission rules.

The server is reachable by anyone who can reach its port, and every stream it accepts costs a slot of
the model's pool, a queue and a task. These rules bound what one client (one remote address) or a crowd
of half-open connections can take, before any audio is decoded:

* a shared **token**, sent as ``Authorization: Bearer <token>`` or as ``"token"`` in the hello (browsers
  cannot set headers on a WebSocket), compared in constant time;
* at most ``max_streams_per_client`` open connections per remote address;
* a **connection rate** per remote address (a token bucket: ``connection_burst`` at once, then
  ``connection_rate`` per second), so a reconnect loop cannot spin the server;
* at most ``max_unready`` connections, all clients together, that have not yet sent a valid hello (a
  slowloris holding sockets open costs a bounded number of them, each for ``hello_timeout`` at most);
* an ``idle_timeout`` (off by default): a connection that sends nothing for that long after its hello is
  closed. The engine's own idle timeout (``streamwavlm stream --idle-timeout``) already ends stalled streams
  and frees their slots; this one is for servers used without the engine, and closes the socket itself.

The policy is pure bookkeeping with the clock injected (like ``Reorderer`` in ``mqtt/subscriber.py``), so
it is tested without sockets; ``websocket.py`` turns a denial into the documented error and close code.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AccessLimits:
    """The admission rules of a WebSocket audio server; the defaults leave a trusted LAN unaffected."""

    token: str | None = field(default=None, repr=False)  # None: no authentication (say so in your deployment)
    max_streams_per_client: int = 8
    connection_rate: float = 5.0  # sustained new connections per second, per remote address
    connection_burst: int = 20  # connections a remote address may open at once
    max_unready: int = 64  # connections that have not finished their hello, all clients together
    idle_timeout: float | None = None  # seconds without a message after the hello; None: never

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ValueError("the WebSocket token must not be empty; leave it unset to accept every client")
        for name in ("max_streams_per_client", "connection_burst", "max_unready"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.connection_rate > 0 or not math.isfinite(self.connection_rate):
            raise ValueError(f"connection_rate must be a positive number, got {self.connection_rate}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive or None, got {self.idle_timeout}")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a guess was right."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


class Denied(Exception):
    """A connection the rules refuse: ``code`` and ``message`` go to the client as the documented error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; :meth:`take` spends one if there is one."""

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.stamp = float(capacity), now

    def level(self, now: float) -> float:
        """Tokens available at ``now`` (the bucket refills lazily)."""
        return min(self.capacity, self.tokens + (now - self.stamp) * self.rate)

    def take(self, now: float) -> bool:
        self.tokens, self.stamp = self.level(now), now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Admission:
    """The live counts behind :class:`AccessLimits`: :meth:`admit` when a connection opens (a
    :class:`Ticket`, or :class:`Denied`), :meth:`authenticate` once its hello is in.

    Buckets of addresses that are full again carry no information and are pruned, so a scan from many
    addresses costs memory only while it lasts.
    """

    PRUNE_ABOVE = 1024

    def __init__(self, limits: AccessLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self._clock = limits, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._open: dict[str, int] = {}
        self.unready = 0

    def admit(self, client: str) -> Ticket:
        """Count one more connection of ``client``, or raise :class:`Denied` (and count nothing)."""
        limits, now = self.limits, self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.PRUNE_ABOVE:
                self._buckets = {k: b for k, b in self._buckets.items() if b.level(now) < b.capacity}
            bucket = self._buckets[client] = TokenBucket(limits.connection_rate, limits.connection_burst, now)
        if not bucket.take(now):
            raise Denied("rate_limited", f"more than {limits.connection_burst} connections at once or "
                         f"{limits.connection_rate:g} per second from {client}; wait "
                         f"{1 / limits.connection_rate:.1f} s before reconnecting, and back off")
        if self._open.get(client, 0) >= limits.max_streams_per_client:
            raise Denied("too_many_streams", f"{client} already has {limits.max_streams_per_client} open "
                         'streams, the limit per client; end one (send {"type": "end"}) first')
        if self.unready >= limits.max_unready:
            raise Denied("server_busy", f"{limits.max_unready} connections are still to send their hello; "
                         "try again in a few seconds")
        self._open[client] = self._open.get(client, 0) + 1
        self.unready += 1
        return Ticket(self, client)

    def authenticate(self, header: str | None, hello_token: str | None) -> None:
        """Raise :class:`Denied` unless no token is configured or the header's or the hello's token is it."""
        expected = self.limits.token
        if expected is None:
            return
        given = bearer_token(header) or hello_token
        if not token_matches(expected, given):
            raise Denied("unauthorized", "a token is required: send the header 'Authorization: Bearer <token>' "
                         'or "token" in the hello' if given is None else
                         "the token is not valid; check the client's configuration")

    def open_streams(self, client: str) -> int:
        """Connections of ``client`` admitted and not yet ended."""
        return self._open.get(client, 0)

    def _release(self, client: str, ready: bool) -> None:
        if not ready:
            self.unready -= 1
        left = self._open[client] - 1
        if left:
            self._open[client] = left
        else:
            del self._open[client]


class Ticket:
    """One admitted connection's share of the counts: :meth:`ready` after its valid hello, :meth:`leave`
    when it ends (both idempotent, so every exit path may call them)."""

    def __init__(self, admission: Admission, client: str) -> None:
        self._admission, self.client = admission, client
        self.is_ready = self.left = False

    def ready(self) -> None:
        """The connection sent a valid hello: it no longer counts against ``max_unready``."""
        if not self.is_ready and not self.left:
            self.is_ready = True
            self._admission.unready -= 1

    def leave(self) -> None:
        if not self.left:
            self.left = True
            self._admission._release(self.client, self.is_ready)
