"""MQTT stream demo: a live terminal view of the embeddings an engine publishes.

The subscriber side of docs/mqtt.md, as a person would watch it: per stream the messages and frames
received, gaps, the latency from a chunk's last audio sample to its arrival here, and two views of the
embeddings themselves. *Novelty* is how far each chunk (its frames' mean) is from the previous two seconds:
low while one voice goes on, a spike when the voice or the sound changes. The *self-similarity matrix* of
the last chunks shows the same as blocks: chunks of one voice are alike (dark), a change starts a new block.
Both use the vectors minus their recent mean, because every frame of a WavLM layer shares a large common
component that would make all cosines look alike.

    python demos/mqtt_stream.py --demo                       # zero set-up: broker + engine in this process
    python demos/mqtt_stream.py --broker mqtt://host:1883 [--prefix P] [--stream ID]

With ``--demo`` the publisher side runs here too: an embedded broker (unless ``--broker`` is given) and
``streamwavlm stream --input <bundled sample> --realtime``, looped. Ctrl-C stops cleanly; ``--seconds N``
stops after N seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rich import box
from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from streamwavlm.cli import build_parser, one_line
from streamwavlm.commands.common import bundled_sample, check_reachable
from streamwavlm.commands.stream import stream
from streamwavlm.mqtt import BrokerUnavailable, EmbeddedBroker, EmbeddingMessage, Gap, Status, subscribe
from streamwavlm.mqtt.message import EMBEDDINGS, ENGINE_ID
from streamwavlm.mqtt.subscriber import Item, SubscriberStats

BARS = " ▁▂▃▄▅▆▇█"
SHADES = " ░▒▓█"
NOVELTY_CONTEXT_S = 2.0  # novelty compares a chunk with this much audio before it
MAX_MATRICES = 3  # self-similarity matrices shown side by side; more streams only get their table row
WIDE = 110  # terminal columns from which the table shows the payload column
STREAM_ID_WIDTH = 14  # longer stream ids are shortened with an ellipsis in the table


def _line(text: Text) -> Text:
    """One terminal line: cut with an ellipsis rather than wrapped into the lines below."""
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def sparkline(values: list[float], lo: float, hi: float) -> str:
    scale = len(BARS) - 1
    return "".join(BARS[round((min(max(v, lo), hi) - lo) / (hi - lo) * scale)] for v in values)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class StreamView:
    """What the subscriber has seen of one stream."""

    window: int  # chunks in the self-similarity matrix (and in the centring mean)
    state: str = "?"
    messages: int = 0
    frames: int = 0
    gaps: int = 0
    lost: int = 0
    shape: str = ""
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=500))
    means: deque[np.ndarray] = field(default_factory=deque)  # chunk means, newest last
    novelty: deque[float] = field(default_factory=lambda: deque(maxlen=32))

    def message(self, msg: EmbeddingMessage, received: float) -> None:
        self.messages += 1
        self.frames += msg.frames
        self.latency_ms.append((received - msg.timestamp) * 1000)
        self.shape = f"{'x'.join(map(str, msg.data.shape))} {msg.data.dtype.kind}{8 * msg.data.dtype.itemsize}"
        mean = msg.data[-1].astype(np.float64).mean(0)  # the last emitted layer, averaged over the chunk
        context = max(1, round(NOVELTY_CONTEXT_S * msg.frame_rate / max(msg.frames, 1)))
        if self.means:
            history = np.stack(list(self.means))
            centre = history.mean(0)
            ref = history[-context:].mean(0)
            self.novelty.append(1.0 - float(_unit(mean - centre) @ _unit(ref - centre)))
        self.means.append(mean)
        while len(self.means) > self.window:
            self.means.popleft()

    def similarity(self) -> np.ndarray:
        """Cosine similarity between the kept chunk means, each minus their mean: (n, n) in [-1, 1]."""
        x = np.stack(list(self.means))
        x = _unit(x - x.mean(0))
        return x @ x.T

    def matrix(self) -> Text:
        """The self-similarity matrix in shades, two characters per cell (a terminal cell is ~2:1 high);
        oldest chunk top left, newest bottom right; negative similarity is blank."""
        if len(self.means) < 2:
            return Text("waiting for chunks...")
        sim = self.similarity()
        scale = len(SHADES) - 1
        rows = ["".join(SHADES[round(min(max(v, 0.0), 1.0) * scale)] * 2 for v in row) for row in sim]
        return Text("\n".join(rows))


class Lines(io.TextIOBase):
    """A text file that keeps its last lines. The in-process publisher's console output goes here and into
    the view: written to the terminal, it would land inside the live display and be drawn over."""

    def __init__(self, keep: int) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self._partial = ""

    def write(self, text: str) -> int:
        *done, self._partial = (self._partial + text).split("\n")
        self.lines.extend(line for line in done if line.strip())
        return len(text)

    def isatty(self) -> bool:
        return False


class View:
    """Every stream's :class:`StreamView`, the engine's state and the subscriber's counters."""

    def __init__(self, source: str, window: int, publisher: str | None) -> None:
        self.source = source
        self.window = window
        self.publisher = publisher  # what publishes in this process (--demo), if anything
        self.publisher_log = Lines(6)
        self.streams: dict[str, StreamView] = {}
        self.engine = "no status yet"
        self.stats = SubscriberStats()
        self.started = time.monotonic()

    def _stream(self, stream_id: str) -> StreamView:
        return self.streams.setdefault(stream_id, StreamView(self.window))

    def add(self, item: Item) -> None:
        received = time.time()
        if isinstance(item, EmbeddingMessage):
            if item.kind == EMBEDDINGS:
                self._stream(item.stream_id).message(item, received)
        elif isinstance(item, Gap):
            s = self._stream(item.stream_id)
            s.gaps += 1
            s.lost += item.count
        elif isinstance(item, Status):
            if item.stream_id == ENGINE_ID:
                self.engine = f"{item.engine_id} {item.state}"
            else:
                self._stream(item.stream_id).state = item.state

    def render(self, width: int = 120) -> Group:
        """The view for a terminal ``width`` columns wide: every line fits without wrapping at 80 columns and
        up; the payload column appears from ``WIDE`` columns on and the novelty sparkline takes what is left."""
        elapsed = time.monotonic() - self.started
        lines: list[Text | Table | Columns] = [
            Text.assemble(("streamwavlm MQTT stream view", "bold"), f"  {elapsed:.0f} s  (Ctrl-C to stop)"),
            _line(Text.assemble(("source ", "bold"), self.source, ("  engine ", "bold"), self.engine)),
        ]
        if self.publisher:
            lines.append(_line(Text(f"publishing here: {self.publisher}", style="dim")))
            lines.extend(_line(Text(f"  {line}", style="dim")) for line in self.publisher_log.lines)
        lines.append(self._table(width))
        panels = [Panel(s.matrix(), title=f"{sid}: last {len(s.means)} chunks", expand=False)
                  for sid, s in sorted(self.streams.items()) if s.messages][:max(1, min(MAX_MATRICES, width // 38))]
        if panels:
            lines.append(Columns(panels))
        st = self.stats
        lines.append(_line(Text(f"subscriber: {st.received} received, {st.duplicates} duplicates dropped, "
                                f"{st.errors} malformed, {st.reconnects} reconnects", style="dim")))
        return Group(*lines)

    def _table(self, width: int) -> Table:
        """Short headings, a legend below; the sparkline gets the columns the other cells leave."""
        wide = width >= WIDE
        headings = ["stream", "state", "msgs", "frames", "gaps", "p50", "p99", *(["payload"] if wide else [])]
        rows = []
        for stream_id, s in sorted(self.streams.items()):
            lat = np.array(s.latency_ms) if s.latency_ms else None
            p50 = f"{np.percentile(lat, 50):.0f}" if lat is not None else "-"
            p99 = f"{np.percentile(lat, 99):.0f}" if lat is not None else "-"
            short_id = stream_id if len(stream_id) <= STREAM_ID_WIDTH else stream_id[: STREAM_ID_WIDTH - 1] + "…"
            rows.append(([short_id, s.state, str(s.messages), str(s.frames), f"{s.gaps} ({s.lost})", p50, p99,
                          *([s.shape] if wide else [])], list(s.novelty)))
        widths = [max([len(h), *(len(r[0][k]) for r in rows)]) for k, h in enumerate(headings)]
        spark = max(4, min(32, width - sum(widths) - 3 * len(headings) - len("1.00 ") - 1))
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False,
                  caption="gaps: missing messages (lost); p50/p99: latency in ms from a chunk's last audio sample "
                  "to receipt; novelty: chunk vs previous 2 s", caption_justify="left")
        for k, heading in enumerate([*headings, "novelty"]):
            t.add_column(heading, no_wrap=True, justify="right" if 2 <= k <= 6 else "left")
        for cells, novelty in rows:
            nov = novelty[-spark:]
            t.add_row(*cells, f"{nov[-1]:4.2f} {sparkline(nov, 0.0, 1.5)}" if nov else "-")
        return t

    def summary(self) -> str:
        parts = []
        for stream_id, s in sorted(self.streams.items()):
            lat = np.array(s.latency_ms) if s.latency_ms else np.zeros(1)
            parts.append(f"{stream_id}: {s.messages} messages, {s.frames} frames, {s.gaps} gaps ({s.lost} lost), "
                         f"latency p50 {np.percentile(lat, 50):.0f} ms p99 {np.percentile(lat, 99):.0f} ms")
        return "; ".join(parts) or "no messages received"


async def receive(broker: str, args: argparse.Namespace, view: View, subscribed: Callable[[], None]) -> None:
    """Feed the view from the broker until cancelled; malformed payloads are counted, not fatal."""
    items = subscribe(broker, args.prefix, args.stream, kinds=(EMBEDDINGS, "status"), stats=view.stats,
                      on_error=lambda topic, error: None, on_subscribed=subscribed)
    async with contextlib.aclosing(items):
        async for item in items:
            view.add(item)


async def publish_demo(broker: str, args: argparse.Namespace, stop: asyncio.Event, log: Lines) -> None:
    """Run ``streamwavlm stream`` on the bundled sample in real time, again and again, until ``stop``; the
    command drains its streams and marks them offline when ``stop`` is set. What it prints goes to ``log``."""
    argv = ["stream", "--input", str(bundled_sample()), "--realtime", "--broker", broker, "--prefix", args.prefix,
            "--capacity", "1", "--chunk", str(args.chunk)]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    # the command's Console writes to whatever sys.stdout is at each write, so the redirection spans it all
    with contextlib.redirect_stdout(log):
        while not stop.is_set():
            await stream(build_parser().parse_args(argv), stop)


async def until(stop: asyncio.Event, *tasks: asyncio.Task[None]) -> None:
    """Wait for ``stop``, or re-raise the failure of any task that ends on its own first."""
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    for task in done - {stopped}:
        task.result()


async def run(args: argparse.Namespace) -> int:
    console = Console(file=sys.stdout)  # this terminal, also while the publisher's output is redirected
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C, and also a closed terminal or a kill: either way the broker child process must not be left behind
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.seconds:
        loop.call_later(args.seconds, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        broker = args.broker or os.environ.get("STREAMWAVLM_MQTT", "mqtt://127.0.0.1:1883")
        if args.demo and args.broker is None:
            broker = await stack.enter_async_context(EmbeddedBroker())
        else:
            check_reachable(broker)  # nothing listening there: say so now, not after the connect timeout
        publisher = (f"streamwavlm stream --input {bundled_sample().name} --realtime (looped) -> {broker}"
                     if args.demo else None)
        view = View(f"{broker} {args.prefix}/{args.stream}/embeddings", args.window, publisher)
        subscribed = asyncio.Event()
        receiver = asyncio.create_task(receive(broker, args, view, subscribed.set))
        await until_subscribed(subscribed, receiver)
        with Live(view.render(console.width), console=console, auto_refresh=False, transient=False) as live:
            publishing = (asyncio.create_task(publish_demo(broker, args, stop, view.publisher_log))
                          if args.demo else None)
            redraw = lambda: live.update(view.render(console.width), refresh=True)  # noqa: E731
            refresh = asyncio.create_task(refresh_every(0.25, redraw))
            try:
                await until(stop, receiver, *([publishing] if publishing else []))
            finally:
                stop.set()
                if publishing is not None:  # it ends by itself once stopped, after draining its streams
                    await settle(publishing)
                    await asyncio.sleep(0.3)  # its last messages and offline statuses are on their way
                for task in (refresh, receiver):
                    task.cancel()
                    await settle(task)
            live.update(view.render(console.width), refresh=True)
    console.print(f"stopped cleanly: {view.summary()}")
    return 0


async def until_subscribed(subscribed: asyncio.Event, receiver: asyncio.Task[None]) -> None:
    """Return once the subscription is in place; raise the receiver's error (broker unreachable) instead."""
    waiter = asyncio.create_task(subscribed.wait())
    await asyncio.wait({waiter, receiver}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if receiver.done():
        receiver.result()


async def refresh_every(seconds: float, redraw: Callable[[], object]) -> None:
    while True:
        redraw()
        await asyncio.sleep(seconds)


async def settle(task: asyncio.Task[None]) -> None:
    """Wait for a task to end; re-raise its failure (a cancellation is how the view's helpers end)."""
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", help="mqtt[s]://[user:pass@]host[:port] (default: $STREAMWAVLM_MQTT, else "
                   "mqtt://127.0.0.1:1883; with --demo: an embedded broker)")
    p.add_argument("--prefix", default="streamwavlm", help="topic prefix (default: %(default)s)")
    p.add_argument("--stream", default="+", help="stream id, or + for all (default: all)")
    p.add_argument("--window", type=int, default=16, help="chunks in the self-similarity matrix (default: 16)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument("--demo", action="store_true", help="also publish: the bundled sample through "
                   "`streamwavlm stream` in this process, to an embedded broker unless --broker is given")
    p.add_argument("--checkpoint", help="--demo: the model (default: $STREAMWAVLM_CHECKPOINT, else random "
                   "Base+-shaped weights)")
    p.add_argument("--chunk", type=int, default=16, help="--demo: frames per encoder step (default: 16)")
    args = p.parse_args()
    if args.window < 2:
        p.error("--window must be at least 2")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:  # Ctrl-C before the event loop took the signal over (while importing)
        return 0
    except (BrokerUnavailable, ValueError) as e:  # the broker cannot be reached, a malformed URL
        print(f"mqtt_stream: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
