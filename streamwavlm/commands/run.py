"""``streamwavlm run``: audio through the model, a summary of the layer embeddings, and a saved copy."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..audio.validate import SAMPLE_RATE, read_wav
from ..checkpoint import model_from_setting
from .common import add_checkpoint_option, bundled_sample


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="embed an audio file (default: the bundled sample) and summarise the layers")
    add_checkpoint_option(p)
    p.add_argument("--audio", metavar="FILE", help="16 kHz audio file (default: the bundled speech sample)")
    p.add_argument("--out", metavar="FILE", default="out/embeddings.npz",
                   help="where to save the hidden states (npz; default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    model, description = model_from_setting(args.checkpoint)
    console.print(f"[bold]model[/]: {description}")
    audio = args.audio or str(bundled_sample())
    wav = read_wav(audio)
    console.print(f"[bold]audio[/]: {audio} ({wav.numel() / SAMPLE_RATE:.2f} s)")
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    out = model(wav[None])
    elapsed = time.perf_counter() - start
    seconds = wav.numel() / SAMPLE_RATE
    table = Table(title=f"layer embeddings: {out.last_hidden_state.shape[1]} frames x "
                        f"{out.last_hidden_state.shape[2]} dims")
    for col in ("layer", "mean |h|", "std", "cos(t, t+1)"):
        table.add_column(col, justify="right")
    for i, h in enumerate(out.hidden_states):
        h = h[0]
        cos = torch.nn.functional.cosine_similarity(h[:-1], h[1:], dim=-1).mean().item() if len(h) > 1 else 1.0
        table.add_row(str(i), f"{h.norm(dim=-1).mean():.3f}", f"{h.std():.3f}", f"{cos:.3f}")
    console.print(table)
    console.print(f"offline forward: {elapsed * 1000:.0f} ms for {seconds:.2f} s of audio "
                  f"(real-time factor {elapsed / seconds:.3f})")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, hidden_states=torch.stack(out.hidden_states)[:, 0].numpy().astype(np.float16),
                        last_hidden_state=out.last_hidden_state[0].numpy())
    console.print(f"saved hidden states to {path}")
    return 0
