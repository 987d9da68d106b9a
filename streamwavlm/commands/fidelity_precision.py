"""``streamwavlm fidelity CHECKPOINT AUDIO --dtype D``: a CPU precision against fp32, per layer.

The precision-vs-fp32 counterpart of the streaming-vs-offline grid: the same metrics
(:func:`streamwavlm.streaming.fidelity.compare`), for the offline forward and for each streaming setting
given (default: C=16, L=250, P=0, the ``stream`` command's defaults).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..audio.validate import SAMPLE_RATE
from ..model.wavlm import WavLM
from ..precision import report, resolve, to_dict
from ..precision_fidelity import PrecisionRow, measure_precision
from ..streaming.settings import NormPolicy, StreamSettings


def compare_precision(args: argparse.Namespace, console: Console, model: WavLM, wav: torch.Tensor,
                      description: str, random_weights: bool) -> int:
    """Print (and with ``--json`` write) per-layer cosine and relative error of ``--dtype`` vs fp32."""
    choice = resolve(args.dtype, allow_emulated=False)
    console.print(f"[bold]model[/]: {description}")
    console.print(f"[bold]precision[/]: {report(choice)}")
    if random_weights:
        console.print("[bold red]RANDOM WEIGHTS[/]: these numbers say nothing about a real checkpoint; run "
                      "`streamwavlm fidelity CHECKPOINT AUDIO --dtype ...` with the model you will deploy.")
    if choice.precision == "float32":
        console.print("float32 is the reference: nothing to compare (auto chose it on this CPU)")
        return 0
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("--dtype compares CPU precision paths; use --device cpu")
    settings = [StreamSettings(chunk=c, left=left, lookahead=p, norm=n, warmup=args.warmup)
                for c in args.chunk or (16,) for left in args.left or (250,) for p in args.lookahead or (0,)
                for n in args.norm or (NormPolicy.RUNNING,)]
    for s in settings:
        s.validate(model.cfg)
    seconds = wav.numel() / SAMPLE_RATE
    console.print(f"[bold]audio[/]: {args.audio} ({seconds:.2f} s)")
    rows = measure_precision(model, wav, choice.precision, settings)
    console.print(_table(rows, choice.precision))
    for r in rows:
        console.print(f"{r.path}: worst layer cosine {r.worst_cosine:.5f}, worst relative error "
                      f"{r.worst_rel_error:.2e}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "checkpoint": args.checkpoint, "model": description, "random_weights": random_weights,
            "audio": args.audio, "seconds": seconds, "precision": to_dict(choice),
            "rows": [r.to_dict() for r in rows],
        }, indent=2))
        console.print(f"json: {args.json}")
    return 0


def _table(rows: list[PrecisionRow], precision: str) -> Table:
    table = Table(title=f"{precision} vs float32 per hidden state (cosine: mean over frames; "
                        "rel err: ||x - x32|| / ||x32||)")
    table.add_column("layer", justify="right")
    for r in rows:
        table.add_column(f"{r.path} cos", justify="right", no_wrap=True)
        table.add_column("rel err", justify="right", no_wrap=True)
    for i in range(len(rows[0].cosine)):
        table.add_row(str(i), *(v for r in rows for v in (f"{r.cosine[i]:.5f}", f"{r.rel_error[i]:.2e}")))
    return table
