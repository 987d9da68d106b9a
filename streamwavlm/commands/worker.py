"""``streamwavlm worker``: one of many engines behind one MQTT broker (docs/scaling.md). Takes the audio of
the streams rendezvous hashing gives it from the group's MQTT audio topics, publishes their embeddings, and
on SIGTERM hands each stream's state to its next owner before it exits."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

import torch
from rich.console import Console

from ..cluster.handover import model_fingerprint
from ..cluster.worker import Worker, WorkerOptions
from ..mqtt.topics import check_level
from ..streaming import StreamPool
from .common import (
    add_checkpoint_option,
    add_device_option,
    add_dtype_option,
    add_stream_options,
    check_reachable,
    positive,
    streaming_model,
)
from .signals import allow, stop_event
from .stream import AUDIO_PREFIX, window_hop


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="one of a group of engines behind one MQTT broker: serves the streams "
                       "the group gives it, hands them over on SIGTERM")
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:port of the group's broker (MQTT 5)")
    p.add_argument("--group", required=True, help="the group's name: workers of one group share its streams")
    p.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}",
                   help="this worker's name in the group, unique (default: HOST-PID)")
    add_checkpoint_option(p)
    add_device_option(p)
    add_stream_options(p)
    add_dtype_option(p)
    p.add_argument("--xvector", type=window_hop, metavar="WINDOW,HOP", help="publish x-vectors over WINDOW "
                   "frames every HOP frames (needs a speaker-head checkpoint)")
    p.add_argument("--prefix", default="streamwavlm", help="topic prefix of the embeddings (default: %(default)s)")
    p.add_argument("--audio-prefix", default=AUDIO_PREFIX,
                   help="audio arrives on PREFIX/audio/<stream> (default: %(default)s)")
    p.add_argument("--cluster-prefix", default="streamwavlm-cluster",
                   help="the group's own topics live under PREFIX/<group>/ (default: %(default)s)")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="QoS of embeddings (default: 1)")
    p.add_argument("--payload-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--capacity", type=positive(int), default=16, help="most concurrent streams (default: %(default)s)")
    p.add_argument("--max-backlog", type=positive(float), default=2.0, help="seconds of queued audio per stream "
                   "before the oldest is dropped (default: %(default)s)")
    p.add_argument("--idle-timeout", type=positive(float), default=30.0, metavar="S",
                   help="end a stream silent for S seconds (default: %(default)s)")
    p.add_argument("--status-interval", type=positive(float), default=5.0, metavar="S",
                   help="publish every stream's live status every S seconds (default: %(default)s)")
    p.add_argument("--keepalive", type=positive(int), default=5, metavar="S", help="MQTT keep-alive of the "
                   "membership connection: a worker whose host dies is noticed within 1.5 x S (default: %(default)s)")
    p.add_argument("--handover-window", type=positive(float), default=5.0, metavar="S",
                   help="seconds of the other workers' streams' audio kept to continue them (default: %(default)s)")
    p.add_argument("--handover-timeout", type=positive(float), default=10.0, metavar="S",
                   help="start a stream afresh when the hand-over its record announces has not come in S "
                        "seconds (default: %(default)s)")
    p.add_argument("--drain-timeout", type=positive(float), default=20.0, metavar="S",
                   help="the longest SIGTERM's drain may take before the process is ended (default: %(default)s)")
    p.set_defaults(func=lambda args: asyncio.run(worker(args)))


async def worker(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/Ctrl-C (or ``stop``), then drain."""
    console = Console()
    torch.set_grad_enabled(False)
    check_level(args.group, "group name")  # mistakes in names before the model takes seconds to load
    check_level(args.name, "worker name")
    check_reachable(args.broker)
    model, settings, model_id = streaming_model(args, console)
    options = WorkerOptions(
        broker=args.broker, group=args.group, name=args.name, model_id=model_id,
        fingerprint=model_fingerprint(model), audio_prefix=args.audio_prefix, prefix=args.prefix,
        cluster_prefix=args.cluster_prefix, keepalive=args.keepalive, max_backlog=args.max_backlog,
        idle_timeout=args.idle_timeout, status_interval=args.status_interval, payload_dtype=args.payload_dtype,
        qos=args.qos, handover_window=args.handover_window, handover_timeout=args.handover_timeout,
        drain_timeout=args.drain_timeout)
    pool = StreamPool(model, settings, capacity=args.capacity)
    stop = stop or stop_event()
    allow(args.drain_timeout + 2)  # SIGTERM drains: hand-overs take longer than the usual 1.5 s stop
    w = Worker(pool, options, say=lambda line: print(line, flush=True))
    print(f"worker {options.name}: audio on {options.audio_prefix}/audio/<stream>, embeddings under "
          f"{options.prefix}/<stream>/embeddings, group {options.group} on {args.broker}", flush=True)
    await w.run(stop)
    return 0
