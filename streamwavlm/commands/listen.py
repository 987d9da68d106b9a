"""``streamwavlm listen``: subscribe to an engine's MQTT output and print one line per message."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TextIO

from ..mqtt.connection import BrokerUnavailable
from ..mqtt.message import EmbeddingMessage, Gap
from ..mqtt.subscriber import Item, subscribe
from ..mqtt.wire import WireError, encode_json, encode_status
from .common import check_reachable, positive
from .signals import stop_event

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("listen", help="print what an engine publishes on MQTT, one line per message")
    p.add_argument("--broker", default=os.environ.get("STREAMWAVLM_MQTT", DEFAULT_BROKER), metavar="URL",
                   help="mqtt[s]://[user:pass@]host[:port][?protocol=3.1.1] "
                        f"(default: $STREAMWAVLM_MQTT, else {DEFAULT_BROKER})")
    p.add_argument("--prefix", default="streamwavlm", help="topic prefix (default: %(default)s)")
    p.add_argument("--stream", default="+", help="stream id, or + for all (default: all)")
    p.add_argument("--kind", action="append", dest="kinds", metavar="KIND",
                   help="embeddings, xvector, status, ... (repeatable; default: embeddings and xvector)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), help="MQTT version (default: the URL's, else 5)")
    p.add_argument("--json", action="store_true",
                   help="print each message in the JSON form of docs/mqtt.md (with its data)")
    p.add_argument("--count", type=positive(int), metavar="N", help="exit after N embedding messages")
    p.add_argument("--timeout", type=positive(float), metavar="S", help="exit after S seconds")
    p.add_argument("--connect-timeout", type=positive(float), default=10.0, metavar="S",
                   help="give up if the broker cannot be reached within S seconds (default: %(default)s)")
    p.add_argument("--session", metavar="ID", help="persistent session under this client id: the broker keeps "
                   "the subscription and queues QoS 1 messages while we are away (a restart of this command, a "
                   "lost connection, a broker restart with persistence), so nothing is lost; one ID per listener")
    p.add_argument("--session-expiry", type=positive(int), default=3600, metavar="S",
                   help="with --session: how long the broker keeps the session while we are away "
                        "(default: %(default)s)")
    p.set_defaults(func=listen)


def listen(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


async def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print until ``--count`` messages or ``--timeout`` seconds; malformed payloads are reported on
    stderr and skipped. Exit code 0, or 2 when the broker cannot be reached."""
    out = out or sys.stdout

    def on_error(topic: str, error: WireError) -> None:
        print(f"streamwavlm listen: skipped a malformed payload: {error}", file=sys.stderr)

    subscribed = asyncio.Event()
    stop = stop_event()  # Ctrl-C sets it, rather than a KeyboardInterrupt inside the MQTT client's callbacks
    try:
        check_reachable(args.broker)  # nothing listening there: say so now, not after --connect-timeout
        items = subscribe(args.broker, args.prefix, args.stream, args.kinds or ("embeddings", "xvector"),
                          protocol=args.protocol, on_error=on_error, connect_timeout=args.connect_timeout,
                          qos=1, session=args.session, session_expiry=args.session_expiry,
                          on_subscribed=subscribed.set)
        async with contextlib.aclosing(items):
            await _until_stopped(_print_items(items, args, out), stop, args.timeout)
    except asyncio.TimeoutError:
        if not subscribed.is_set():  # --timeout ran out before the broker ever answered
            print(f"streamwavlm listen: error: no connection to MQTT broker {args.broker} within --timeout "
                  f"{args.timeout:g} s; check that a broker runs there", file=sys.stderr)
            return 2
    except (BrokerUnavailable, ValueError) as e:  # ValueError: a bad URL, prefix or kind
        print(f"streamwavlm listen: error: {e}", file=sys.stderr)
        return 2
    return 0


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event, timeout: float | None) -> None:
    """Run ``work`` until it ends, ``stop`` is set (then return quietly) or ``timeout`` passes
    (``asyncio.TimeoutError``); its errors are raised here."""
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, stopped):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
    if task in done:
        task.result()
    elif not done:
        raise asyncio.TimeoutError


async def _print_items(items: AsyncIterator[Item], args: argparse.Namespace, out: TextIO) -> None:
    printed = 0
    async for item in items:
        print(format_item(item, as_json=args.json), file=out, flush=True)
        printed += isinstance(item, EmbeddingMessage)
        if args.count is not None and printed >= args.count:
            return


def format_item(item: Item, *, as_json: bool) -> str:
    """One line: a summary for people, or with ``as_json`` the documented JSON forms (each line's
    ``format`` field says which: streamwavlm, streamwavlm-status or streamwavlm-gap)."""
    if isinstance(item, EmbeddingMessage):
        if as_json:
            return encode_json(item)
        shape = "x".join(map(str, item.data.shape))
        latency = (time.time() - item.timestamp) * 1000
        return (f"{item.stream_id} {item.kind} seq={item.seq} frames={item.first_frame}+{item.frames} "
                f"shape={shape} {item.data.dtype} latency={latency:.1f}ms")
    if isinstance(item, Gap):
        if as_json:
            return json.dumps({"format": "streamwavlm-gap", "stream_id": item.stream_id, "kind": item.kind,
                               "epoch": item.epoch, "first_seq": item.first_seq, "count": item.count})
        return f"{item.stream_id} {item.kind} GAP seq={item.first_seq}..{item.last_seq} ({item.count} lost)"
    if as_json:
        return encode_status(item).decode()
    counters = " ".join(f"{k}={v}" for k, v in item.counters.items())
    return f"{item.stream_id} status {item.state} engine={item.engine_id} {counters}".rstrip()
