"""Our streaming resampler against python-soxr (libsoxr, VHQ and HQ), on the same signals, in one process.

Measured, for conversion to 16 kHz:

* in-band error: sines from 100 Hz to 0.9 x the lower Nyquist frequency, the steady-state output against
  the ideal sine at each output sample's time (worst absolute error, and worst amplitude error in dB);
* stop-band rejection: tones from 8.2 to 23 kHz at 48 kHz input, the worst output level in dB relative to
  the tone (everything above 8 kHz can only come out as aliasing);
* block-size invariance: random noise fed in blocks of 1, 7, 160, 441 and 4096 samples against the whole
  signal at once: the worst absolute difference (0 means bit-identical);
* latency: the most input (ms) that must arrive beyond a sample's time before that sample comes out,
  feeding 1 ms blocks;
* speed: CPU time per second of 48 kHz audio, fed in 20 ms blocks as a live source delivers it.

    python benchmarks/bench_resample.py [--out benchmarks/results/resample.md]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr
from common import cpu_report, finish

from streamwavlm.audio.resample import Resampler

OUT = 16000
RATES = (8000, 22050, 44100, 48000)
SECONDS = 2.0
EDGE = 0.25  # seconds skipped at both ends: the steady state only

Stream = Callable[[np.ndarray, bool], np.ndarray]  # (block, last) -> output


def ours(rate: int) -> Stream:
    r = Resampler(rate, OUT)
    return lambda x, last: np.concatenate([r.process(x), r.flush()]) if last else r.process(x)


def soxr_stream(quality: str) -> Callable[[int], Stream]:
    def make(rate: int) -> Stream:
        s = soxr.ResampleStream(rate, OUT, 1, dtype="float32", quality=quality)
        return lambda x, last: s.resample_chunk(x, last=last)
    return make


CANDIDATES: dict[str, Callable[[int], Stream]] = {"ours (Kaiser sinc, 80 dB)": ours,
                                                  "soxr VHQ": soxr_stream("VHQ"), "soxr HQ": soxr_stream("HQ")}


def run_blocks(make: Callable[[int], Stream], rate: int, x: np.ndarray, block: int) -> np.ndarray:
    stream = make(rate)
    pieces = [stream(x[i:i + block], False) for i in range(0, len(x), block)]
    return np.concatenate([*pieces, stream(np.zeros(0, np.float32), True)])


def in_band(make: Callable[[int], Stream], rate: int) -> tuple[float, float]:
    """Worst absolute error and worst amplitude error (dB) over in-band sines."""
    top = 0.9 * min(rate, OUT) / 2
    worst_err, worst_db = 0.0, 0.0
    for f in np.linspace(100, top, 12):
        n = int(SECONDS * rate)
        x = (0.5 * np.sin(2 * np.pi * f * np.arange(n) / rate)).astype(np.float32)
        y = run_blocks(make, rate, x, 4096)
        t = np.arange(len(y)) / OUT
        keep = (t > EDGE) & (t < SECONDS - EDGE)
        ideal = 0.5 * np.sin(2 * np.pi * f * t[keep])
        worst_err = max(worst_err, float(np.abs(y[keep] - ideal).max()))
        amp = np.sqrt(2) * np.sqrt(np.mean(y[keep].astype(np.float64) ** 2))
        worst_db = max(worst_db, abs(20 * np.log10(amp / 0.5)))
    return worst_err, worst_db


def stop_band(make: Callable[[int], Stream], rate: int = 48000) -> float:
    """Worst output level (dB re the input tone) of tones between 8.2 kHz and 23 kHz."""
    worst = -400.0
    for f in np.linspace(8200, 23000, 25):
        n = int(SECONDS * rate)
        x = np.sin(2 * np.pi * f * np.arange(n) / rate).astype(np.float32)
        y = run_blocks(make, rate, x, 4096)
        mid = y[int(EDGE * OUT): int((SECONDS - EDGE) * OUT)].astype(np.float64)
        level = np.sqrt(np.mean(mid ** 2)) * np.sqrt(2)
        worst = max(worst, 20 * np.log10(max(level, 1e-20)))
    return worst


def block_invariance(make: Callable[[int], Stream], rate: int) -> float:
    x = np.random.default_rng(0).standard_normal(int(SECONDS * rate)).astype(np.float32) * 0.3
    whole = run_blocks(make, rate, x, len(x))
    worst = 0.0
    for block in (1, 7, 160, 441, 4096):
        y = run_blocks(make, rate, x, block)
        if len(y) != len(whole):
            return float("inf")
        worst = max(worst, float(np.abs(y - whole).max()))
    return worst


def latency_ms(make: Callable[[int], Stream], rate: int) -> float:
    x = np.random.default_rng(1).standard_normal(int(SECONDS * rate)).astype(np.float32) * 0.3
    stream, block, out, worst = make(rate), rate // 1000, 0, 0.0
    for i in range(0, len(x) - block + 1, block):
        out += len(stream(x[i:i + block], False))
        worst = max(worst, (i + block) / rate - out / OUT)
    return 1000 * worst


def speed_ms_per_s(make: Callable[[int], Stream], rate: int = 48000, seconds: float = 20.0) -> float:
    x = np.random.default_rng(2).standard_normal(int(seconds * rate)).astype(np.float32) * 0.3
    block = rate // 50
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        run_blocks(make, rate, x, block)
        best = min(best, time.process_time() - start)
    return 1000 * best / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    lines = [*cpu_report(), f"python-soxr {soxr.__version__}; signals of {SECONDS:.0f} s; output 16 kHz", ""]
    lines += ["| resampler | input Hz | in-band worst abs error | in-band worst amplitude dB | block-size worst "
              "abs difference | latency ms |", "|---|---|---|---|---|---|"]
    for name, make in CANDIDATES.items():
        for rate in RATES:
            err, db = in_band(make, rate)
            lines.append(f"| {name} | {rate} | {err:.2e} | {db:.4f} | {block_invariance(make, rate):.1e} | "
                         f"{latency_ms(make, rate):.1f} |")
    lines += ["", "| resampler | stop band 8.2-23 kHz at 48 kHz: worst level dB | CPU ms per s of 48 kHz audio, "
              "20 ms blocks |", "|---|---|---|"]
    for name, make in CANDIDATES.items():
        lines.append(f"| {name} | {stop_band(make):.1f} | {speed_ms_per_s(make):.2f} |")
    finish(lines, args.out)


if __name__ == "__main__":
    main()
