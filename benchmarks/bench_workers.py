"""Scale-out: aggregate real-time streams for 1, 2 and 3 ``streamwavlm worker`` processes behind one broker.

For each worker count N, one mosquitto child and N worker processes (random Base+-shaped weights, as
``streamwavlm stream`` without a checkpoint; ``--dtype`` as given, C=16, L=250; each worker gets
``cores // N`` torch threads, at least 1) run on this machine. Then S streams of speech are published in
real time, each from its own MQTT 5 client in 20 ms messages with offsets, for ``--seconds`` seconds, and a
subscriber receives every embedding message. A run keeps up when every stream's output is complete (no
frames dropped by the engines' overload policy, the final frame reached) and the 95th percentile of the
delay from a chunk's last audio sample to its receipt stays under ``--max-delay`` seconds. S grows by
``--step`` until a run does not keep up; the last S that did is the aggregate real-time capacity.

The producers and the subscriber run in this process, so they share the cores too (as the broker does):
the figures are what this whole machine sustains, and "streams per core" divides by all its cores.

Run: ``.venv/bin/python benchmarks/bench_workers.py [--quick]
[--out benchmarks/results/workers.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import numpy as np
from common import cpu_report, finish

from streamwavlm.audio.files import load_audio
from streamwavlm.audio.mqtt_audio import publish_audio
from streamwavlm.commands.common import bundled_sample
from streamwavlm.mqtt import Mosquitto
from streamwavlm.mqtt.wire import decode

AUDIO, PREFIX = "b-audio", "b"


def start_workers(n: int, broker: str, dtype: str) -> list[subprocess.Popen[str]]:
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "streamwavlm.cli", "worker", "--broker", broker, "--group", "b",
                               "--name", f"w{i}", "--prefix", PREFIX, "--audio-prefix", AUDIO, "--dtype", dtype,
                               "--capacity", "64", "--status-interval", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(n)]
    for p in procs:  # each says when it has joined
        assert p.stdout is not None
        for line in p.stdout:
            if "joined group" in line:
                break
        else:
            raise RuntimeError(f"a worker ended before joining (exit {p.wait()})")
    return procs


async def trial(port: int, streams: int, seconds: float, run: int, speech: np.ndarray) -> dict[str, float]:
    """S real-time streams through the group; the delays and completeness the subscriber saw."""
    n = int(seconds * 16000)
    ids = [f"r{run}s{i}" for i in range(streams)]
    wavs = {sid: (np.roll(speech, 7919 * i)[:n] * 32768).astype(np.int16) for i, sid in enumerate(ids)}
    frames_expected = (n - 400) // 320 + 1
    delays: list[float] = []
    frames: dict[str, int] = dict.fromkeys(ids, 0)
    last: dict[str, int] = dict.fromkeys(ids, 0)
    holes = 0

    async def collect(ready: asyncio.Event) -> None:
        nonlocal holes
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-sub-{run}") as client:
            await client.subscribe(f"{PREFIX}/+/embeddings", qos=1)
            ready.set()
            async for message in client.messages:
                m = decode(message.payload)  # type: ignore[arg-type]
                delays.append(time.time() - m.timestamp)
                holes += m.first_frame != last[m.stream_id]
                last[m.stream_id] = m.first_frame + m.frames
                frames[m.stream_id] += m.frames

    async def one(sid: str) -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"mic-{sid}",
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await publish_audio(client, AUDIO, sid, wavs[sid], 16000, realtime=True)

    ready = asyncio.Event()
    collector = asyncio.create_task(collect(ready))
    await ready.wait()
    await asyncio.gather(*(one(sid) for sid in ids))
    deadline = time.monotonic() + 10
    while any(f < frames_expected for f in frames.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    collector.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collector
    d = np.array(delays) if delays else np.array([np.inf])
    return {"p50": float(np.percentile(d, 50)), "p95": float(np.percentile(d, 95)),
            "complete": float(sum(f >= frames_expected for f in frames.values())), "holes": float(holes)}


async def capacity(port: int, args: argparse.Namespace, speech: np.ndarray, lines: list[str], n: int) -> int:
    best = 0
    s = args.step
    run = 0
    while s <= args.max_streams:
        run += 1
        r = await trial(port, s, args.seconds, n * 1000 + run, speech)
        ok = r["complete"] == s and r["holes"] == 0 and r["p95"] < args.max_delay
        lines.append(f"| {n} | {s} | {r['p50'] * 1000:.0f} | {r['p95'] * 1000:.0f} | {int(r['complete'])}/{s} | "
                     f"{int(r['holes'])} | {'yes' if ok else 'no'} |")
        print(lines[-1], flush=True)
        if not ok:
            break
        best = s
        s += args.step
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--max-streams", type=int, default=64)
    parser.add_argument("--max-delay", type=float, default=1.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="4 s runs, steps of 4 streams")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.step = 4.0, 4
    speech = load_audio(bundled_sample())
    speech = np.concatenate([speech] * int(np.ceil(args.seconds * 16000 / len(speech) + 1)))
    cores = os.cpu_count() or 1
    lines = [*cpu_report(), "",
             f"Random Base+-shaped weights, --dtype {args.dtype}, C=16, L=250; {args.seconds:g} s of speech per "
             "stream, "
             f"published in real time (20 ms messages); keeps up: complete, no frames dropped, p95 delay < "
             f"{args.max_delay:g} s. One mosquitto, the producers and the subscriber share the {cores} cores.", "",
             "| workers | streams | delay p50 ms | delay p95 ms | complete | holes | keeps up |",
             "|---|---|---|---|---|---|---|"]
    summary = ["", "| workers | threads each | real-time streams | streams per core |", "|---|---|---|---|"]
    for n in (int(x) for x in args.workers.split(",")):
        with Mosquitto() as broker:
            procs = start_workers(n, broker.url, args.dtype)
            try:
                best = asyncio.run(capacity(broker.port, args, speech, lines, n))
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(30)
        summary.append(f"| {n} | {max(1, cores // n)} | {best} | {best / cores:.1f} |")
    finish(lines + summary, args.out)


if __name__ == "__main__":
    main()
