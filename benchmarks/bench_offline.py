"""Offline forward: our model vs transformers' WavLMModel on the same audio, in the same process.

Prints a markdown table of real-time factor, speed ratio and peak memory for Base and Large at 10 s and 60 s
(2 threads). Run: ``.venv/bin/python benchmarks/bench_offline.py [--sizes base,large] [--seconds 10,60]``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from common import cpu_report, finish, hf_model, median_time, ours_from_hf, peak_memory_mb, speech


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="base,large")
    ap.add_argument("--seconds", default="10,60")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    lines = [*cpu_report(), "",
        f"Offline forward, fp32, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; median of {args.repeats} after one warm-up.",
        "",
        "| model | audio | transformers s (RTF) | streamwavlm s (RTF) | speed-up | transformers peak MB | "
        "streamwavlm peak MB | memory ratio | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes.split(","):
        ref = hf_model(size)
        with tempfile.TemporaryDirectory() as d:
            ours = ours_from_hf(ref, Path(d))
        for seconds in (float(s) for s in args.seconds.split(",")):
            wav = speech(seconds)[None]
            t_ref = median_time(lambda ref=ref, wav=wav: ref(wav), args.repeats)
            t_ours = median_time(lambda ours=ours, wav=wav: ours(wav), args.repeats)
            m_ref = peak_memory_mb(lambda ref=ref, wav=wav: ref(wav))
            m_ours = peak_memory_mb(lambda ours=ours, wav=wav: ours(wav))
            diff = (ref(wav).last_hidden_state - ours(wav).last_hidden_state).abs().max().item()
            line = (f"| {size} | {seconds:.0f} s | {t_ref:.2f} ({t_ref / seconds:.3f}) | {t_ours:.2f} "
                    f"({t_ours / seconds:.3f}) | {t_ref / t_ours:.2f}x | {m_ref:.0f} | {m_ours:.0f} | "
                    f"{m_ref / max(m_ours, 1):.1f}x | {diff:.1e} |")
            print(line, flush=True)
            lines.append(line)
    finish(lines, args.out)


if __name__ == "__main__":
    main()
