"""Live speaker turns in the terminal, then the RTTM and a timeline PNG.

    python demos/diarize.py [--input FILE|mic] [--out DIR] [--realtime] [--latency S] [--profiles FILE]
                            [--background FILE]

Without ``--input`` it synthesises a three-voice conversation with espeak-ng (and writes its reference
RTTM, so the plot shows the truth above the hypothesis and the DER is printed). Runs headless.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import soundfile as sf

from streamwavlm.cli import main as cli
from streamwavlm.diarization import espeak
from streamwavlm.diarization.der import score
from streamwavlm.diarization.rttm import read_rttm, write_rttm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="audio file or mic[:DEVICE] (default: a synthesised conversation)")
    p.add_argument("--out", default="diarization-demo", help="output folder (default: %(default)s)")
    p.add_argument("--realtime", action="store_true", help="play files in real time")
    p.add_argument("--latency", type=float, default=2.0)
    p.add_argument("--profiles", help="enrolled speakers (streamwavlm enroll)")
    p.add_argument("--background", help="a background model (streamwavlm background) learnt on other speakers")
    p.add_argument("--checkpoint", help="WavLM checkpoint for the engine (default: random Base+-shaped weights)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (microphone)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = None
    source = args.input
    if source is None:
        if not espeak.available():
            print("demo: espeak-ng and sox are needed to synthesise a conversation (apt espeak-ng sox), "
                  "or pass --input FILE", file=sys.stderr)
            return 2
        conv = espeak.conversation(seed=3, speakers=3, duration=30)
        source = str(out / "conversation.wav")
        sf.write(source, conv.audio, 16000)
        reference = out / "reference.rttm"
        write_rttm(reference, "conversation", conv.reference)
        voices = ", ".join(f"{k}={v[0]}" for k, v in conv.voices.items())
        print(f"synthesised {len(conv.audio) / 16000:.0f} s: {voices}")
    rttm, png = out / "hypothesis.rttm", out / "timeline.png"
    argv = ["diarize", "--input", source, "--latency", str(args.latency), "--rttm", str(rttm), "--png", str(png)]
    argv += ["--realtime"] * args.realtime + ["--profiles", args.profiles] * bool(args.profiles)
    argv += ["--background", args.background] * bool(args.background)
    argv += ["--checkpoint", args.checkpoint] * bool(args.checkpoint)
    argv += ["--reference", str(reference)] * bool(reference) + ["--seconds", str(args.seconds)] * bool(args.seconds)
    code = cli(argv)
    if code == 0 and reference is not None:
        s = score(read_rttm(reference)["conversation"], read_rttm(rttm).get("conversation", []))
        print(f"DER {100 * s.der:.1f} %  JER {100 * s.jer:.1f} %  (collar 0)")
    return code


if __name__ == "__main__":
    sys.exit(main())
