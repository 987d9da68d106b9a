"""``streamwavlm diarize``: who speaks when, live. Audio through the engine in-process (speech activity and
resemblyzer on a tap of the audio, or the engine's WavLM x-vectors), or the ``xvector`` topic of an engine
running elsewhere (``--subscribe``). Turns are printed as they become known, published on
``<prefix>/<stream>/speakers`` with ``--broker``, and written as RTTM / PNG at the end."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from ..checkpoint import model_from_setting
from ..diarization import background
from ..diarization.clustering import ClusterSettings
from ..diarization.embedders import RESEMBLYZER, window_from_message
from ..diarization.events import SpeakerPublisher
from ..diarization.pipeline import Session
from ..diarization.plot import plot_timeline
from ..diarization.profiles import load_profiles
from ..diarization.rttm import Segment, format_rttm, read_rttm
from ..diarization.turns import TurnEvent
from ..engine import Engine
from ..mqtt import BrokerUnavailable, EmbeddingMessage, Status, subscribe
from ..streaming import StreamPool, XVectorSettings
from .common import add_checkpoint_option, add_stream_options, bundled_sample, settings_from_args
from .stream import _sources, check_input, window_hop


def add_diarization_options(p: argparse.ArgumentParser) -> None:
    """Backend options shared by ``diarize``, ``enroll`` and ``background`` (the windows they compare)."""
    g = p.add_argument_group("diarization")
    g.add_argument("--backend", choices=("resemblyzer", "wavlm"), default="resemblyzer",
                   help="speaker embeddings: resemblyzer (pretrained, bundled) or the WavLM checkpoint's "
                        "x-vectors (needs a WavLMForXVector checkpoint) (default: %(default)s)")
    g.add_argument("--xvector", type=window_hop, default="150,50", metavar="WINDOW,HOP",
                   help="WavLM x-vector window and hop in frames (default: %(default)s)")
    g.add_argument("--vad", choices=("auto", "silero", "energy", "none"), default="auto",
                   help="speech activity detector (default: silero-vad when installed, else energy; none: every "
                        "window counts as speech)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diarize", help="online speaker diarization: who speaks when, live (docs/diarization.md)")
    add_checkpoint_option(p)
    add_stream_options(p)
    add_diarization_options(p)
    p.add_argument("--profiles", metavar="FILE", help="enrolled speakers (JSON, from `streamwavlm enroll`)")
    p.add_argument("--input", metavar="SOURCE", help="FILE, mic[:DEVICE], ws://HOST:PORT or mqtt://HOST:PORT "
                   "(audio through the engine in-process; default: the bundled sample)")
    p.add_argument("--subscribe", metavar="URL", help="instead of --input: diarize the 'xvector' topic of an "
                   "engine publishing to this broker (no speech activity: every x-vector counts as speech)")
    p.add_argument("--stream", default="+", help="with --subscribe: the stream id (exit when it ends), or + for "
                   "all (default: all, until --seconds or Ctrl-C)")
    p.add_argument("--prefix", default="streamwavlm", help="topic prefix (default: %(default)s)")
    p.add_argument("--broker", metavar="URL", help="publish turn events on <prefix>/<stream>/speakers there")
    p.add_argument("--latency", type=float, default=2.0,
                   help="seconds a label may still be revised before it is final (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine below which a window is a new speaker (default: the backend's tuned value; "
                        "0.9 with --background)")
    p.add_argument("--background", metavar="FILE",
                   help="a background model (from `streamwavlm background`, learnt on other speakers' speech): "
                        "compares voices along the directions that tell speakers apart (docs/diarization.md)")
    p.add_argument("--max-speakers", type=int, default=20)
    p.add_argument("--rttm", metavar="FILE", help="write the final turns as RTTM")
    p.add_argument("--png", metavar="FILE", help="write a timeline plot (one file per stream: FILE-<stream>.png)")
    p.add_argument("--reference", metavar="RTTM", help="reference turns to draw in the plot")
    p.add_argument("--realtime", action="store_true", help="pace file input in real time")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument("--quiet", action="store_true", help="print only final turns")
    p.set_defaults(func=lambda args: asyncio.run(diarize(args)))


# new-speaker thresholds tuned on the development split of the espeak conversations (docs/benchmarks.md);
# WavLM: the model card's verification threshold
THRESHOLDS = {"resemblyzer": ClusterSettings().new_threshold, "wavlm": 0.86}


def cluster_settings(args: argparse.Namespace) -> ClusterSettings:
    """The clustering's settings: those tuned for the backend, or for a background's projected windows."""
    base = background.CLUSTER if args.background else ClusterSettings().with_threshold(THRESHOLDS[args.backend])
    new = args.threshold if args.threshold is not None else base.new_threshold
    return dataclasses.replace(base.with_threshold(new), max_speakers=args.max_speakers)


def backend_id(args: argparse.Namespace) -> str:
    """The embedding space, as recorded in profile files."""
    if args.backend == RESEMBLYZER:
        return RESEMBLYZER
    return f"wavlm:{Path(args.checkpoint).name if args.checkpoint else 'random-base-plus'}"


def xvector_settings(args: argparse.Namespace) -> XVectorSettings:
    return XVectorSettings(*args.xvector)


class Printer:
    """Turn events to the terminal: provisional ones dimmed unless ``quiet``, final ones always."""

    def __init__(self, out: TextIO, quiet: bool) -> None:
        self.out, self.quiet = out, quiet

    def __call__(self, stream_id: str, events: list[TurnEvent]) -> None:
        for e in events:
            if self.quiet and e.event != "final":
                continue
            print(f"{stream_id} {e.event:<6} turn {e.turn:<4} {e.start:8.2f} - {e.end:8.2f} s  {e.label:<14} "
                  f"confidence {e.confidence:.2f}", file=self.out, flush=True)


def write_outputs(args: argparse.Namespace, streams: dict[str, list[Segment]],
                  reference: dict[str, list[Segment]]) -> None:
    if args.rttm:
        Path(args.rttm).write_text("".join(format_rttm(sid, turns) for sid, turns in streams.items()))
        print(f"RTTM: {args.rttm}")
    if args.png:
        for sid, turns in streams.items():
            path = Path(args.png) if len(streams) == 1 else Path(args.png).with_name(f"{Path(args.png).stem}-{sid}.png")
            plot_timeline(path, turns, reference.get(sid), title=sid)
            print(f"timeline: {path}")


async def diarize(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.subscribe and args.input:
        raise ValueError("--input and --subscribe exclude each other")
    if args.latency < 0:
        raise ValueError(f"--latency must be >= 0 seconds, got {args.latency}")
    enrolled = load_profiles(args.profiles, backend_id(args)) if args.profiles else []
    projection = background.load_background(args.background, backend_id(args)) if args.background else None
    # read before the run: a bad reference is refused at once, not after it
    reference = read_rttm(args.reference) if args.reference else {}
    xs = xvector_settings(args)
    vad = None if args.subscribe or args.vad == "none" else args.vad
    session = Session(backend=args.backend, latency=args.latency, vad=vad,
                      cluster=cluster_settings(args), enrolled=enrolled, background=projection,
                      xvector_window=xs.window)
    session.handlers.append(Printer(out, args.quiet))
    if enrolled:
        print(f"enrolled speakers: {', '.join(s.name for s in enrolled)}", file=out)
    async with contextlib.AsyncExitStack() as stack:
        if args.broker:
            try:
                publisher = await stack.enter_async_context(SpeakerPublisher(args.broker, args.prefix))
            except BrokerUnavailable as e:
                raise ValueError(str(e)) from None
            session.handlers.append(publisher.publish)
        if args.subscribe:
            await _from_mqtt(args, session)
        else:
            await _in_process(args, session, xs)
        await session.drain()
    for stream_id, seconds in session.skipped.items():
        print(f"warning: {stream_id}: {seconds:.1f} s of live input were not diarized (this machine could not keep "
              "up; those stretches count as silence)", file=sys.stderr)
    write_outputs(args, session.finished, reference)
    return 0


async def _in_process(args: argparse.Namespace, session: Session, xs: XVectorSettings) -> None:
    torch.set_grad_enabled(False)
    spec = args.input or str(bundled_sample())
    check_input(spec)  # before the model loads: a bad file, device or broker is said at once, in one line
    model, description = model_from_setting(args.checkpoint)
    settings = settings_from_args(args, model.cfg)
    if args.backend == "wavlm":
        settings = dataclasses.replace(settings, xvector=xs)
        settings.validate(model.cfg)
        session.hop_samples = model.cfg.hop
    print(f"model: {description}", file=sys.stderr)
    pool = StreamPool(model, settings, capacity=16)
    deadline = time.monotonic() + args.seconds if args.seconds else None
    async with Engine(pool, [session.sink]) as engine:
        async def accept() -> None:
            async for source, stream_id, live in _sources(spec, args):
                engine.add(session.tap(source, stream_id, live=live), stream_id, live=live)  # type: ignore[arg-type]

        acceptor = asyncio.create_task(accept())
        network = spec.startswith(("ws://", "mqtt://"))
        # a network input runs until --seconds, unless its server or broker fails (the acceptor ends)
        while (not acceptor.done() or (not network and engine.streams)) and (
                deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.1)
        if acceptor.done() and acceptor.exception():
            raise acceptor.exception()  # type: ignore[misc]
        acceptor.cancel()
        for s in list(engine.streams.values()):
            await s.source.close()
        await engine.drain()
    session.close_all()


async def _from_mqtt(args: argparse.Namespace, session: Session) -> None:
    """x-vectors from the broker; a stream ends when its status goes offline (or at --seconds)."""
    seen: set[str] = set()

    async def consume() -> None:
        items = subscribe(args.subscribe, args.prefix, args.stream, ("xvector", "status"), connect_timeout=10,
                          on_error=lambda topic, e: print(f"skipped a malformed payload on {topic}: {e}",
                                                          file=sys.stderr))
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, EmbeddingMessage):
                    seen.add(item.stream_id)
                    w = window_from_message(item, session.xvector_window)
                    session.windows(item.stream_id, [w])
                elif isinstance(item, Status) and item.state == "offline" and item.stream_id in seen:
                    session.close(item.stream_id)
                    seen.discard(item.stream_id)
                    if args.stream != "+":
                        return

    try:
        await asyncio.wait_for(consume(), args.seconds)
    except asyncio.TimeoutError:
        pass
    except BrokerUnavailable as e:
        raise ValueError(str(e)) from None
    session.close_all()
