"""``streamwavlm run``: audio through the streaming encoder chunk by chunk, with per-chunk latency.

The audio (default: the bundled speech sample) is handed to the encoder one step at a time, as the engine
does for a live source; every step's compute time is measured. The emitted frames are compared with the offline model
over the same audio, and saved.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..audio.files import load_audio
from ..audio.queue import SampleQueue
from ..audio.validate import SAMPLE_RATE
from ..checkpoint import model_from_setting
from ..embedding import resolve_device
from ..progress import Bar
from ..streaming import StreamPool
from .common import (
    ONE_FRAME,
    add_checkpoint_option,
    add_device_option,
    add_dtype_option,
    add_stream_options,
    bundled_sample,
    cpu_dtype,
    precision_line,
    settings_from_args,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="stream an audio file (default: the bundled sample) through the encoder")
    add_checkpoint_option(p)
    add_device_option(p)
    add_dtype_option(p)
    add_stream_options(p)
    p.add_argument("--audio", metavar="FILE", help="audio file, any rate and channel count (default: the bundled "
                   "speech sample)")
    p.add_argument("--out", metavar="FILE", default="out/embeddings.npz",
                   help="where to save the streamed frames (npz; default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    device = resolve_device(args.device)
    audio = args.audio or str(bundled_sample())
    # the audio first: a bad file is said at once, not after the model has loaded (seconds)
    wav = torch.from_numpy(load_audio(audio, min_samples=ONE_FRAME))
    model, description = model_from_setting(args.checkpoint, dtype=cpu_dtype(args))
    model = model.to(device)
    cfg = model.cfg
    settings = settings_from_args(args, cfg)
    seconds = wav.numel() / SAMPLE_RATE
    console.print(f"[bold]model[/]: {description}")
    console.print(precision_line(model))
    console.print(f"[bold]audio[/]: {audio} ({seconds:.2f} s)")
    console.print(f"[bold]streaming[/]: chunk {settings.chunk} frames, left context {settings.left}, lookahead "
                  f"{settings.lookahead}, {settings.norm.value} statistics; algorithmic latency "
                  f"{settings.latency_ms(cfg):.0f} ms")
    torch.set_grad_enabled(False)
    pool = StreamPool(model, settings)
    slot = pool.open("sample")
    queue = SampleQueue()
    queue.put(wav.numpy())
    step_ms, outputs = [], []
    with Bar("streaming", round(seconds, 1), unit="s of audio") as bar:
        while len(queue) >= (need := pool.need(slot)):
            samples = queue.take(need)
            start = time.perf_counter()
            outputs += pool.step({slot: samples})
            step_ms.append(1000 * (time.perf_counter() - start))
            bar.advance(len(samples) / SAMPLE_RATE)
    start = time.perf_counter()
    outputs += pool.close(slot, queue.take(len(queue)))
    flush_ms = 1000 * (time.perf_counter() - start)
    frames = torch.cat([o.frames for o in outputs], 1).cpu()  # (layers, T, D)
    offline = model(wav[None].to(device))
    table = Table(title=f"streamed embeddings: {frames.shape[1]} frames x {frames.shape[2]} dims")
    for col in ("layer", "mean |h|", "cosine vs offline", "rel. error vs offline"):
        table.add_column(col, justify="right")
    for row, layer in enumerate(outputs[0].layers):
        ref = (offline.last_hidden_state if layer == cfg.num_layers and settings.final_norm
               else offline.hidden_states[layer])[0]
        ref, got = ref.cpu(), frames[row]
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
        rel = ((got - ref).norm() / ref.norm()).item()
        table.add_row(str(layer), f"{got.norm(dim=-1).mean():.3f}", f"{cos:.4f}", f"{rel:.4f}")
    console.print(table)
    ms = np.array(step_ms)
    chunk_s = settings.chunk * cfg.hop / SAMPLE_RATE
    console.print(
        f"per-chunk compute latency over {len(ms)} chunks: p50 {np.percentile(ms, 50):.1f} ms, "
        f"p95 {np.percentile(ms, 95):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms, max {ms.max():.1f} ms "
        f"(chunk = {chunk_s * 1000:.0f} ms of audio); flush {flush_ms:.1f} ms; "
        f"real-time factor {(ms.sum() + flush_ms) / 1000 / seconds:.3f}"
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, frames=frames.numpy(), layers=np.array(outputs[0].layers),
                        frame_rate=SAMPLE_RATE / cfg.hop, step_ms=ms)
    console.print(f"saved streamed frames to {path}")
    return 0

