"""Soak (heavy): over an hour of audio at accelerated pace through a tiny model, with streams opening and
closing throughout, keeps resident memory, file descriptors, threads and asyncio tasks flat.

Run with ``make test-heavy`` (or ``pytest -m heavy tests/test_soak.py -s`` to see the report). The slope is
fitted over the second half: resident memory first grows while oneDNN (through torch's ideep) compiles and
caches a primitive per new input shape (the last step of each stream has a length of its own), up to its
cache's capacity, which the engine sets to 128 entries (``LRU_CACHE_CAPACITY``; torch's default 1024 kept
growing for the whole run). The figures go to docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_engine import ListSource, split

from streamwavlm.checkpoint import load_model
from streamwavlm.engine import Engine, EngineOutput
from streamwavlm.streaming import StreamPool, StreamSettings

AUDIO_SECONDS = float(os.environ.get("STREAMWAVLM_SOAK_SECONDS", 3 * 3600))  # over many streams
CAPACITY = 4


def sample() -> dict[str, float]:
    """Footprint now; freed heap is first handed back to the system (glibc ``malloc_trim``), so that what
    is measured is memory in use, not the allocator's free lists."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(), "tasks": len(asyncio.all_tasks())}


@pytest.mark.heavy
def test_an_hour_of_streams_opening_and_closing_keeps_a_flat_footprint(hf_models):
    model = load_model(hf_models["base"][1])
    settings = StreamSettings(chunk=50, left=100, lookahead=4, layers=(1, 3))
    rng = np.random.default_rng(0)
    frames = [0]
    samples: list[tuple[float, dict[str, float]]] = []  # (audio seconds processed so far, sample)

    async def sink(out: EngineOutput) -> None:
        frames[0] += out.chunk.num_frames

    async def main() -> tuple[int, float]:
        async with Engine(StreamPool(model, settings, capacity=CAPACITY), [sink]) as engine:
            started, total, i = 0.0, 0.0, 0
            t0 = time.monotonic()
            while total < AUDIO_SECONDS or engine.streams:
                while total < AUDIO_SECONDS and len(engine.streams) < CAPACITY:
                    seconds = float(rng.uniform(20, 120))
                    audio = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
                    engine.add(ListSource(f"s{i}", split(audio, 3200)), f"s{i}", live=False)
                    total += seconds
                    i += 1
                await asyncio.sleep(0.5)
                done = sum(s["processed"] for s in engine.status()) / 16000
                if done - started >= 60:
                    started = done
                    samples.append((done, sample()))
            return i, time.monotonic() - t0

    streams, wall = asyncio.run(main())
    audio_h = np.array([a for a, _ in samples]) / 3600
    keep = slice(len(samples) // 2, None)
    report = {}
    for key in ("rss_mb", "fds", "threads", "tasks"):
        values = np.array([s[key] for _, s in samples])
        slope = float(np.polyfit(audio_h[keep], values[keep], 1)[0])
        report[key] = (values.min(), values.max(), slope)
    print(f"\nsoak: {streams} streams, {audio_h[-1]:.2f} h of audio in {wall:.0f} s "
          f"({audio_h[-1] * 3600 / wall:.0f}x real time), {frames[0]} frames; samples every minute of audio")
    for key, (lo, hi, slope) in report.items():
        print(f"  {key}: min {lo:.1f} max {hi:.1f} slope {slope:+.2f} per hour of audio")
    print("  rss_mb by hour of audio: " + " ".join(f"{a:.2f}h:{s['rss_mb']:.0f}" for a, s in
                                                  zip(audio_h[::6], [s for _, s in samples][::6], strict=True)))
    assert audio_h[-1] >= 1.0 and streams >= 30
    assert report["rss_mb"][2] < 20, report  # MB per hour of audio, after warm-up
    assert report["fds"][1] - report["fds"][0] <= 4 and report["threads"][1] - report["threads"][0] <= 4
    assert report["tasks"][1] <= CAPACITY + 4  # one reader per open stream, the scheduler, the loop's own
