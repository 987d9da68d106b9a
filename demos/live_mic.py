"""Live microphone demo: input level, chunk latency, real-time factor, drops and an embedding view.

The view a person can follow is the similarity of each new frame to the previous two seconds: it stays
high while one voice continues and dips when the voice or the sound changes. Ctrl-C stops cleanly.

    python demos/live_mic.py [--device NAME|INDEX] [--checkpoint PATH] [--list-devices] [--seconds N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections import deque

import numpy as np
import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from streamwavlm.audio.level import Metered
from streamwavlm.audio.microphone import MicrophoneSource, list_devices
from streamwavlm.audio.validate import AudioError
from streamwavlm.checkpoint import model_from_setting
from streamwavlm.cli import one_line
from streamwavlm.commands.signals import exit_now, guarded, stop_event
from streamwavlm.engine import Engine, EngineOutput
from streamwavlm.streaming import StreamPool, StreamSettings

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float], lo: float, hi: float) -> str:
    scale = len(BARS) - 1
    return "".join(BARS[round((min(max(v, lo), hi) - lo) / (hi - lo) * scale)] for v in values)


class View:
    """What the screen shows, updated by the level meter and the engine's sink."""

    def __init__(self, description: str, latency_ms: float) -> None:
        self.description = description
        self.algorithmic_ms = latency_ms
        self.level_db = -120.0
        self.levels: deque[float] = deque(maxlen=60)
        self.similarity: deque[float] = deque(maxlen=60)
        self.recent: deque[torch.Tensor] = deque(maxlen=100)  # last 2 s of frames
        self.latency_ms: deque[float] = deque(maxlen=200)
        self.frames = 0

    def level(self, _stream_id: str, db: float) -> None:
        self.level_db = db
        self.levels.append(db)

    async def sink(self, out: EngineOutput) -> None:
        self.latency_ms.append(out.latency * 1000)
        for frame in out.chunk.frames[-1]:
            if self.recent:
                ref = torch.stack(list(self.recent)).mean(0)
                self.similarity.append(torch.nn.functional.cosine_similarity(frame, ref, dim=0).item())
            self.recent.append(frame)
        self.frames += out.chunk.num_frames

    def render(self, engine: Engine) -> Table:
        t = Table(title="streamwavlm live microphone (Ctrl-C to stop)", show_header=False, expand=False)
        t.add_column(justify="right", style="bold")
        t.add_column()
        status = engine.status()[0] if engine.status() else {}
        lat = np.array(self.latency_ms) if self.latency_ms else np.zeros(1)
        t.add_row("model", self.description)
        t.add_row("input level", f"{self.level_db:6.1f} dBFS  {sparkline(list(self.levels), -80, 0)}")
        t.add_row("chunk latency", f"p50 {np.percentile(lat, 50):.0f} ms  p99 {np.percentile(lat, 99):.0f} ms "
                                   f"(+ {self.algorithmic_ms:.0f} ms algorithmic)")
        t.add_row("real-time factor", f"{status.get('rtf') or 0:.3f}")
        t.add_row("frames", str(self.frames))
        t.add_row("dropped", f"{status.get('dropped', 0)} samples")
        sims = list(self.similarity)[-60:]
        t.add_row("similarity to last 2 s", f"{sims[-1] if sims else 0:+.2f}  {sparkline(sims, 0, 1)}")
        return t


async def run(args: argparse.Namespace) -> int:
    model, description = model_from_setting(args.checkpoint)
    settings = StreamSettings(chunk=args.chunk, left=args.left)
    view = View(description.split(":")[0], settings.latency_ms(model.cfg))
    console = Console()
    mic = MicrophoneSource(args.device, block=800)
    stop = stop_event()  # Ctrl-C / SIGTERM: stop cleanly, and within 2 s whatever happens
    if args.seconds:
        asyncio.get_running_loop().call_later(args.seconds, stop.set)
    async with Engine(StreamPool(model, settings), [view.sink]) as engine, mic:
        engine.add(Metered(mic, view.level), "mic")
        with Live(view.render(engine), console=console, refresh_per_second=4, transient=False) as live:
            while not stop.is_set() and engine.streams:  # the stream ends early if the microphone is lost
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)
                live.update(view.render(engine))
        await mic.close()
        await engine.drain()
        status = engine.status()
    if status[0]["error"]:
        raise AudioError(str(status[0]["error"]))
    console.print(f"stopped cleanly: {view.frames} frames, dropped {status[0]['dropped']} samples")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="input device name (substring) or index; default: the system default")
    p.add_argument("--checkpoint", help="checkpoint (default: $STREAMWAVLM_CHECKPOINT, else random weights)")
    p.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--left", type=int, default=250)
    args = p.parse_args()
    if args.list_devices:
        devices = list_devices()
        for d in devices:
            print(f"{d.index:3d}  {d.name}  ({d.channels} ch, {d.default_samplerate:.0f} Hz)")
        if not devices:
            print("no input devices: PortAudio sees no microphone (on a machine without a sound card, see "
                  "docs/audio.md for a PulseAudio pipe source)", file=sys.stderr)
        return 0 if devices else 1
    if args.device is not None and args.device.isdigit():
        args.device = int(args.device)
    torch.set_grad_enabled(False)
    with guarded("live_mic") as signalled:
        try:
            code = asyncio.run(run(args))
        except AudioError as e:  # no such device, no device at all, the microphone lost
            print(f"live_mic: {one_line(e)}", file=sys.stderr)
            code = 2
    if signalled():
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
