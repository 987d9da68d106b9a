"""Streaming encoder on Base-size weights: per-chunk latency and real-time factor, with baselines.

Baselines in the same process on the same audio: transformers' offline forward over the whole utterance,
and naive re-running of our offline model on each chunk's window (left context + chunk). Audio is handed
over one step at a time, as the engine does for a live source; each step is timed.
Run: ``.venv/bin/python benchmarks/bench_streaming.py [--seconds 20] [--quick]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_report, finish, hf_model, median_time, ours_from_hf, speech

from streamwavlm.streaming import StreamPool, StreamSettings


def stream_latency(model, wavs: list[torch.Tensor], settings: StreamSettings) -> tuple[np.ndarray, float]:
    """Per-step latencies (ms) and total compute seconds for ``len(wavs)`` streams stepped together."""
    pool = StreamPool(model, settings, capacity=len(wavs))
    slots = [pool.open(f"s{i}") for i in range(len(wavs))]
    pos, steps = 0, []
    while pos + pool.need(slots[0]) <= wavs[0].numel():
        n = pool.need(slots[0])
        audio = {slot: wav[pos:pos + n] for slot, wav in zip(slots, wavs, strict=True)}
        start = time.perf_counter()
        pool.step(audio)
        steps.append(1000 * (time.perf_counter() - start))
        pos += n
    start = time.perf_counter()
    for slot, wav in zip(slots, wavs, strict=True):
        pool.close(slot, wav[pos:])
    total = sum(steps) / 1000 + time.perf_counter() - start
    return np.array(steps), total


def naive_windows(model, wav: torch.Tensor, settings: StreamSettings) -> float:
    """Seconds to re-run the offline model on every chunk's window (left context + chunk)."""
    hop, rf = model.cfg.hop, model.cfg.receptive_field
    c, left = settings.chunk, settings.left
    n_frames = model.cfg.num_frames(wav.numel())
    start = time.perf_counter()
    for first in range(0, n_frames, c):
        lo = max(0, first - left)
        model(wav[None, lo * hop:(first + c - 1) * hop + rf])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="C=16, L=250 only")
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    ref = hf_model("base")
    with tempfile.TemporaryDirectory() as d:
        model = ours_from_hf(ref, Path(d))
    wav = speech(args.seconds)
    secs = args.seconds
    t_ref = median_time(lambda: ref(wav[None]), repeats=1)
    lines = [*cpu_report(), "",
             f"Base size, fp32, {args.threads} threads, {secs:.0f} s of audio stepped chunk by chunk. "
             f"transformers offline forward on the same audio: {t_ref:.2f} s (RTF {t_ref / secs:.3f}).", "",
             "| C | L | algorithmic latency ms | p50 ms | p95 ms | p99 ms | RTF | naive window re-run RTF |",
             "|---|---|---|---|---|---|---|---|"]
    grid = [(16, 250)] if args.quick else [(c, lf) for c in (8, 16, 25, 50) for lf in (100, 250, 500)]
    for c, left in grid:
        s = StreamSettings(chunk=c, left=left)
        ms, total = stream_latency(model, [wav], s)
        naive = naive_windows(model, wav[: 5 * 16000], s) / 5 if (c, left) in ((16, 250), (50, 250)) else None
        line = (f"| {c} | {left} | {s.latency_ms(model.cfg):.0f} | {np.percentile(ms, 50):.1f} | "
                f"{np.percentile(ms, 95):.1f} | {np.percentile(ms, 99):.1f} | {total / secs:.3f} | "
                f"{'' if naive is None else f'{naive:.3f}'} |")
        print(line, flush=True)
        lines.append(line)
    lines += ["", "Batched streams (C=16, L=250), stepped together:", "",
              "| streams | p50 ms | p99 ms | RTF per stream | total RTF |", "|---|---|---|---|---|"]
    for n in (1, 2, 4, 8):
        wavs = [wav.roll(i * 4000) for i in range(n)]
        ms, total = stream_latency(model, wavs, StreamSettings(chunk=16, left=250))
        line = (f"| {n} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 99):.1f} | "
                f"{total / secs / n:.3f} | {total / secs:.3f} |")
        print(line, flush=True)
        lines.append(line)
    finish(lines, args.out)


if __name__ == "__main__":
    main()
