"""Broker URLs, TLS, protocol choice and reconnect backoff, shared by the publisher and the subscriber.

Both sides open a fresh ``aiomqtt.Client`` for every (re)connection: an aiomqtt client whose connection
broke has pending calls that only time out, so starting clean is simpler and faster than reusing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

Protocol = Literal["5", "3.1.1"]
PROTOCOLS: dict[str, aiomqtt.ProtocolVersion] = {
    "5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311,
}
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached or refused us; the message says which broker, why, and what to do."""


@dataclass(frozen=True)
class TLSOptions:
    """TLS for ``mqtts://``: a CA file to trust (default: the system's), an optional client certificate,
    and ``insecure=True`` to skip the hostname check (self-signed test brokers only)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.insecure:
            ctx.check_hostname = False
        return ctx


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL: ``mqtt[s]://[user[:password]@]host[:port][?protocol=5|3.1.1]``.

    A bare ``host[:port]`` means ``mqtt://``. The ``protocol`` query parameter lets a URL say what its
    broker speaks (EmbeddedBroker's amqtt fallback yields ``?protocol=3.1.1``).
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: Protocol | None = None

    @property
    def display(self) -> str:
        """The URL without credentials, for messages and logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse a broker URL; raises ValueError with the accepted forms on anything else."""
    forms = ("expected mqtt://host[:port] or mqtts://host[:port] (optionally user:password@ and "
             "?protocol=5|3.1.1)")
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r} has scheme {parts.scheme!r}; {forms}")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port; {forms}") from None
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host; {forms}")
    query = parse_qs(parts.query)
    protocol = query.pop("protocol", [None])[-1]
    if query or (parts.path not in ("", "/")):
        raise ValueError(f"broker URL {url!r} has an unexpected path or query; {forms}")
    return BrokerAddress(
        host=parts.hostname, port=port, tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        protocol=check_protocol(protocol) if protocol is not None else None,
    )


def check_protocol(value: str) -> Protocol:
    if value not in PROTOCOLS:
        raise ValueError(f"MQTT protocol {value!r} must be '5' or '3.1.1'")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Connection:
    """Everything needed to open one client: address, credentials, protocol, TLS, timeouts."""

    address: BrokerAddress
    protocol: Protocol
    tls: TLSOptions | None
    timeout: float
    keepalive: int

    @classmethod
    def create(cls, broker: str, *, username: str | None, password: str | None, protocol: Protocol | None,
               tls: TLSOptions | None, timeout: float, keepalive: int) -> Connection:
        """Arguments override what the URL says; the protocol defaults to the URL's, else MQTT 5."""
        address = parse_broker_url(broker)
        if username is not None or password is not None:
            user = username if username is not None else address.username
            if user is None:
                raise ValueError("a password needs a username (argument or user:password@ in the URL)")
            address = replace(address, username=user,
                              password=password if password is not None else address.password)
        if tls is not None and not address.tls:
            raise ValueError(f"TLS options given for {address.display}: use an mqtts:// URL")
        chosen = check_protocol(protocol) if protocol is not None else (address.protocol or "5")
        return cls(address, chosen, tls if tls is not None or not address.tls else TLSOptions(),
                   timeout, keepalive)

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    def client(self, identifier: str, *, will: aiomqtt.Will | None = None, session_expiry: int | None = None,
               queue_size: int | None = None, max_packet_size: int | None = None) -> aiomqtt.Client:
        """A new client. ``session_expiry`` (seconds) asks for a persistent session: the broker keeps the
        subscriptions and queues QoS 1 messages while we are away (clean_session=False on 3.1.1).
        ``queue_size`` bounds aiomqtt's incoming queue (it discards beyond it). ``max_packet_size`` (MQTT 5
        only) asks the broker not to deliver larger packets at all: the client would read a whole packet into
        memory before anyone could look at its size."""
        persistent = session_expiry is not None
        properties = None
        if self.v5 and (persistent or max_packet_size is not None):
            properties = Properties(PacketTypes.CONNECT)
            if persistent:
                properties.SessionExpiryInterval = session_expiry
            if max_packet_size is not None:
                properties.MaximumPacketSize = max_packet_size
        # paho refuses clean_session on v5 and anything but its default clean_start on 3.1.1
        session: dict[str, Any] = (
            {"clean_start": not persistent} if self.v5 else {"clean_session": not persistent})
        client = aiomqtt.Client(
            self.address.host, self.address.port, username=self.address.username,
            password=self.address.password, identifier=identifier, protocol=PROTOCOLS[self.protocol],
            will=will, properties=properties, **session,
            tls_context=self.tls.context() if self.tls else None,
            tls_insecure=self.tls.insecure if self.tls else None,
            timeout=self.timeout, keepalive=self.keepalive, max_queued_incoming_messages=queue_size,
        )
        _no_delay(client)
        return client

    def unavailable(self, error: BaseException | None, waited: float) -> BrokerUnavailable:
        """The error for a broker we gave up on, with the likely fix."""
        silent = error is None or isinstance(error, asyncio.TimeoutError) or not str(error)
        text = f"no answer within {waited:.1f} s" if silent else str(error)
        v311_hint = ("; a broker that speaks only MQTT 3.1.1 may refuse or ignore an MQTT 5 CONNECT: use "
                     "protocol='3.1.1' (or ?protocol=3.1.1 in the URL)") if self.v5 else ""
        if isinstance(error, MqttConnectError):
            hint = "the broker answered and refused the connection"
            if "protocol" in text.lower():
                hint += v311_hint
            elif "password" in text.lower() or "authori" in text.lower():
                hint += "; check the username and password"
        elif silent or "timed out" in text.lower():
            hint = f"nothing answered, or the broker did not answer the MQTT CONNECT{v311_hint}"
        else:
            hint = (f"is a broker running there? start one with `mosquitto -p {self.address.port}` or use "
                    f"EmbeddedBroker; waited {waited:.1f} s")
        return BrokerUnavailable(f"cannot connect to MQTT broker {self.address.display}: {text} ({hint})")


def _no_delay(client: aiomqtt.Client) -> None:
    """Turn Nagle's algorithm off on the client's socket once it opens. paho (2.2) never does, and a 25-50 KB
    embedding message then waits for the previous one's ACK: a publisher kept up with 192 streams at QoS 1
    with Nagle and 768 without (benchmarks/results/mqtt.md). aiomqtt keeps its paho client private and uses
    ``on_socket_open`` itself, hence the wrapping."""
    paho = getattr(client, "_client", None)
    if paho is None:
        return
    opened = paho.on_socket_open

    def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if opened is not None:
            opened(c, userdata, sock)

    paho.on_socket_open = on_socket_open


def abandon(client: aiomqtt.Client) -> None:
    """Close what a failed connection left open. aiomqtt keeps the socket of a connect whose CONNACK timed
    out (a hung broker accepts TCP but does not answer); if the broker woke up later, that orphan would
    complete its connect with our will and client id. paho's disconnect() closes it (a no-op without a
    socket); aiomqtt keeps its paho client private, hence the attribute access."""
    paho = getattr(client, "_client", None)
    if paho is not None:
        paho.disconnect()


def is_refusal(error: BaseException) -> bool:
    """A negative CONNACK: the broker answered, so retrying with the same settings will not help."""
    return isinstance(error, MqttConnectError)


class Backoff:
    """Exponential backoff with jitter: attempt n waits a uniform draw in [d/2, d], d = min(max, first*2**n).

    Jitter keeps many engines from reconnecting in lockstep after a broker restart.
    """

    def __init__(self, first: float = 0.1, maximum: float = 10.0) -> None:
        if not 0 < first <= maximum:
            raise ValueError(f"backoff needs 0 < first ({first}) <= maximum ({maximum})")
        self.first = first
        self.maximum = maximum
        self.attempt = 0

    def next_delay(self) -> float:
        d = min(self.maximum, self.first * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return random.uniform(d / 2, d)

    def reset(self) -> None:
        self.attempt = 0
