"""The engine core before and after a change, in one process: per-step cost of the streaming pool.

Loads the package as it was at ``--before`` (a git revision) under another name next to the current one,
builds both pools over the same Base-size random weights, and times the same steps with both, interleaved
(``--repeats`` rounds of ``--steps`` steps each, medians), so machine load hits both alike. Cases: one
stream; 2 and 4 streams in adjacent slots and in scattered slots (with busy slots between them); 8 streams.
Timed per step: handing over one step's audio (``push`` before, a queue ``take`` after) and the step.

    .venv/bin/python benchmarks/bench_core.py --before 59b44fd --out benchmarks/results/core.md
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from common import cpu_report, finish, hf_model, ours_from_hf

from streamwavlm.audio.queue import SampleQueue
from streamwavlm.streaming import StreamPool, StreamSettings

REPO = Path(__file__).resolve().parents[1]
CASES = {"1 stream": [0], "2 adjacent [0,1]": [0, 1], "2 scattered [0,2]": [0, 2],
         "4 adjacent [0..3]": [0, 1, 2, 3], "4 scattered [0,2,4,6]": [0, 2, 4, 6], "8 streams": list(range(8))}


def load_revision(rev: str, name: str = "streamwavlm_before") -> ModuleType:
    """The package (with its kernels) as of ``rev``, importable as ``name`` beside the current one."""
    archive = subprocess.run(["git", "archive", rev, "streamwavlm", "kernels"], cwd=REPO, check=True,
                             capture_output=True).stdout
    root = Path(tempfile.mkdtemp(prefix="bench-core-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    package = root / name
    (root / "streamwavlm").rename(package)
    (root / "kernels").rename(package / "kernels")
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bstreamwavlm(?=[.\s])", name, path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def occupy(pool, slots: list[int], capacity: int) -> None:
    """Open streams so that the measured ones sit in ``slots`` and every other slot is busy."""
    for i in range(capacity):
        pool.open(f"s{i}")
    for i in range(capacity):
        if i not in slots:
            continue
        pool.discard(i)
        pool.open(f"s{i}")


def step_after(pool: StreamPool, slots: list[int], queues: dict[int, SampleQueue], audio: np.ndarray) -> None:
    for slot in slots:
        queues[slot].put(audio[: pool.need(slot)])
    pool.step({slot: queues[slot].take(pool.need(slot)) for slot in slots})


def step_before(pool, slots: list[int], audio: np.ndarray) -> None:
    for slot in slots:
        pool.push(slot, audio[: pool.needed(slot)])
    pool.step(slots)


def timed(fn: Callable[[], None], steps: int, clock: Callable[[], float]) -> list[float]:
    out = []
    for _ in range(steps):
        start = clock()
        fn()
        out.append(1000 * (clock() - start))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="59b44fd", help="git revision to compare against")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: one thread, timed by its CPU time (robust when other work shares the machine)")
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    threads = 1 if args.clock == "cpu" else args.threads
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    old = load_revision(args.before)
    old_checkpoint = importlib.import_module(f"{old.__name__}.checkpoint")
    old_streaming = importlib.import_module(f"{old.__name__}.streaming")
    with tempfile.TemporaryDirectory() as d:
        new_model = ours_from_hf(hf_model("base"), Path(d))
        old_model = old_checkpoint.load_model(d)
    settings = dict(chunk=16, left=250)
    audio = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    what = "thread CPU ms" if args.clock == "cpu" else "wall ms"
    lines = [*cpu_report(), "", f"Base size, fp32, {threads} thread(s), C=16, L=250, pool capacity "
             f"{args.capacity}; per-step {what} (audio hand-over + step), median of {args.repeats} x {args.steps} "
             f"steps after 3 warm-up steps, before ({args.before}) and after interleaved.", "",
             "| case | before ms | after ms | after / before |", "|---|---|---|---|"]
    for case, slots in CASES.items():
        pools = {"before": old_streaming.StreamPool(old_model, old_streaming.StreamSettings(**settings),
                                                    args.capacity),
                 "after": StreamPool(new_model, StreamSettings(**settings), args.capacity)}
        for pool in pools.values():
            occupy(pool, slots, args.capacity)
        queues = {slot: SampleQueue() for slot in slots}
        steps: dict[str, Callable[[], None]] = {
            "before": lambda p=pools["before"], s=slots: step_before(p, s, audio),
            "after": lambda p=pools["after"], s=slots, q=queues: step_after(p, s, q, audio),
        }
        times: dict[str, list[float]] = {"before": [], "after": []}
        for fn in steps.values():
            timed(fn, 3, clock)
        for _ in range(args.repeats):
            for name, fn in steps.items():
                times[name] += timed(fn, args.steps, clock)
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        line = f"| {case} | {before:.1f} | {after:.1f} | {after / before:.2f} |"
        print(line, flush=True)
        lines.append(line)
    finish(lines, args.out)


if __name__ == "__main__":
    main()
