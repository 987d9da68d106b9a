"""``streamwavlm.embed`` throughput: seconds of audio embedded per second, by batch size, on this machine.

Random Base+-shaped weights (the cost does not depend on the values). Two front ends, because batching
differs: GroupNorm (Base, Base+) batches only files of equal length, so the files here are of equal length;
a LayerNorm front end (Large's, here at Base+ size) pads mixed lengths. Files come from the bundled sample.

    python benchmarks/bench_embed.py [--files 8] [--seconds 8] [--batch-sizes 1,4,8] [--out benchmarks/results/embed.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from common import cpu_report, finish, median_time, speech

import streamwavlm
from streamwavlm.config import WavLMConfig
from streamwavlm.model.wavlm import WavLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting, after one warm-up")
    p.add_argument("--out", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("out/bench-embed"))
    args = p.parse_args()
    torch.manual_seed(0)
    audio = speech(args.seconds * args.files).numpy()
    n = int(args.seconds * 16000)
    rng = np.random.default_rng(0)
    corpora = {}
    for kind in ("equal", "mixed"):
        folder = args.workdir / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.files):
            length = n if kind == "equal" else int(n * rng.uniform(0.5, 1.0))
            sf.write(folder / f"{i}.wav", audio[i * n: i * n + length], 16000, subtype="FLOAT")
        corpora[kind] = folder
    lines = [*cpu_report(),
             f"{args.files} files of {args.seconds:.0f} s (mixed: 50-100 % of that); median of {args.repeats}", "",
             "| front end | files | batch size | wall s | audio s per wall s |", "|---|---|---|---|---|"]
    for mode, kind in (("default", "equal"), ("layer_norm", "mixed")):
        model = WavLM(WavLMConfig(extractor_mode=mode))
        total = sum(sf.info(f).duration for f in corpora[kind].iterdir())
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            folder, net = corpora[kind], model
            t = median_time(lambda b=batch, f=folder, m=net: streamwavlm.embed(f, m, batch_size=b),
                            repeats=args.repeats)
            label = "GroupNorm (Base+)" if mode == "default" else "LayerNorm (Large-type)"
            lines.append(f"| {label} | {kind} | {batch} | {t:.2f} | {total / t:.1f} |")
    finish(lines, args.out)


if __name__ == "__main__":
    main()
