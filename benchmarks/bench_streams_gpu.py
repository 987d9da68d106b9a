"""How many real-time Base streams one GPU sustains: the streaming pool end to end on CUDA.

For each stream count N the pool steps N streams together, one chunk of C frames each, with the Triton
attention kernel; a count is sustained when the p99 step time stays under ``--p99-ms`` (the issue's 100 ms)
and under the chunk's own duration (real time). Random Base-size weights; fp16 by default.
Run on a GPU machine: ``.venv/bin/python benchmarks/bench_streams_gpu.py [--dtype float16] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from streamwavlm.config import WavLMConfig
from streamwavlm.model.wavlm import WavLM
from streamwavlm.streaming import StreamPool, StreamSettings


def started_pool(model: WavLM, settings: StreamSettings, n: int, graphs: bool,
                 warmup: int = 3) -> tuple[StreamPool, Callable[[], dict[int, np.ndarray]]]:
    """A pool of ``n`` streams past their first steps (which also autotune the kernels and capture the graph),
    and a source of one step's random audio for each."""
    pool = StreamPool(model, settings, capacity=n, cuda_graphs=graphs)
    slots = [pool.open(f"s{i}") for i in range(n)]
    rng = np.random.default_rng(0)

    def audio() -> dict[int, np.ndarray]:
        return {slot: rng.standard_normal(pool.need(slot)).astype(np.float32) * 0.1 for slot in slots}

    for _ in range(warmup):
        pool.step(audio())
    return pool, audio


def step_times(model: WavLM, settings: StreamSettings, n: int, steps: int, graphs: bool) -> np.ndarray:
    pool, audio = started_pool(model, settings, n, graphs)
    times = []
    for _ in range(steps):
        batch = audio()
        torch.cuda.synchronize()
        start = time.perf_counter()
        pool.step(batch)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return np.array(times)


def launch_profile(model: WavLM, settings: StreamSettings, n: int, graphs: bool) -> str:
    """One step of ``n`` streams under the profiler: wall time against the GPU's busy time and the kernel count.

    When the wall time far exceeds the summed kernel time, the step is bound by the host (Python and kernel
    launches), which is what a CUDA graph would remove.
    """
    from torch.profiler import ProfilerActivity, profile

    pool, audio = started_pool(model, settings, n, graphs)
    batch = audio()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        pool.step(batch)
        torch.cuda.synchronize()
        wall = 1000 * (time.perf_counter() - start)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / 1000
    mode = "graphs" if graphs else "eager"
    return f"| {n} | {mode} | {wall:.2f} | {busy:.2f} | {busy / wall:.0%} | {len(kernels)} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--left", type=int, default=250)
    ap.add_argument("--counts", default="1,16,64,256,512,768,1024,1536")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--p99-ms", type=float, default=100.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", default="1,64,512",
                    help="stream counts whose step is profiled for launch overhead ('' for none)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_streams_gpu: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = WavLM(WavLMConfig()).to("cuda", getattr(torch, args.dtype)).eval()
    settings = StreamSettings(chunk=args.chunk, left=args.left)
    chunk_ms = settings.chunk * 20
    lines = [f"{torch.cuda.get_device_name()}, Base size, {args.dtype}, C={args.chunk} ({chunk_ms} ms), "
             f"L={args.left}; {args.steps} steps per count.", "",
             "Each count is stepped eagerly and with the Transformer stage replayed from CUDA graphs (the pool's "
             "default on a GPU); the ratio is graphs / eager p50.", "",
             "| streams | eager p50 ms | eager p99 ms | graphs p50 ms | graphs p99 ms | graphs / eager | "
             "RTF per stream (graphs) | sustained (graphs) |", "|---|---|---|---|---|---|---|---|"]
    best = 0
    for n in (int(x) for x in args.counts.split(",")):
        try:
            eager, graphed = (step_times(model, settings, n, args.steps, graphs) for graphs in (False, True))
        except torch.cuda.OutOfMemoryError:
            lines.append(f"| {n} | out of memory | | | | | | no |")
            break
        p99 = float(np.percentile(graphed, 99))
        ok = p99 <= args.p99_ms and p99 <= chunk_ms
        best = n if ok else best
        e50, g50 = np.percentile(eager, 50), np.percentile(graphed, 50)
        lines.append(f"| {n} | {e50:.1f} | {np.percentile(eager, 99):.1f} | {g50:.1f} | {p99:.1f} | {g50 / e50:.2f} | "
                     f"{g50 / chunk_ms / n:.5f} | {'yes' if ok else 'no'} |")
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    lines += ["", f"Most real-time Base streams sustained with p99 step <= {args.p99_ms:.0f} ms: {best}"]
    if args.profile:
        lines += ["", "One profiled step (GPU busy = summed kernel time; a low share means host/launch bound):", "",
                  "| streams | step | wall ms | GPU busy ms | busy share | kernels |", "|---|---|---|---|---|---|"]
        lines += [launch_profile(model, settings, int(n), graphs) for n in args.profile.split(",")
                  for graphs in (False, True)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
