"""``streamwavlm fidelity``: streaming vs offline, per layer, over a grid of settings (table, PNG, JSON)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.table import Table

from ..audio.files import load_audio
from ..audio.validate import SAMPLE_RATE, AudioError
from ..checkpoint import load_model
from ..config import WavLMConfig
from ..embedding import resolve_device
from ..model.wavlm import WavLM
from ..progress import Bar
from ..streaming.fidelity import (
    DEFAULT_CHUNKS,
    DEFAULT_LEFTS,
    DEFAULT_LOOKAHEADS,
    FidelityRow,
    measure,
    pareto_front,
    plot,
    settings_grid,
    streams_statistics,
)
from ..streaming.settings import NormPolicy
from .common import add_device_option, add_dtype_option
from .fidelity_precision import compare_precision

RANDOM = "random"  # the CHECKPOINT name that means random Base+-shaped weights
T = TypeVar("T")


def _list_of(kind: Callable[[str], T], what: str) -> Callable[[str], tuple[T, ...]]:
    """An argparse type for a comma-separated list, with a usage error that names the option's meaning."""
    def parse(text: str) -> tuple[T, ...]:
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from e
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what}")
        return values
    return parse


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fidelity", help="per-layer cosine / relative error of streaming vs offline over a grid of settings",
        description="Stream AUDIO through the model once per setting and compare every hidden state with the "
                    "offline forward over the same audio. Meaningful only with the checkpoint you will "
                    "deploy: with random weights the numbers say nothing about a real model.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help=f"original .pt file, Hugging Face directory or model name; the literal '{RANDOM}' uses random "
                        "Base+-shaped weights (for trying the tool only; ./random names a file)")
    p.add_argument("audio", metavar="AUDIO",
                   help="audio file (WAV/FLAC/OGG, any rate; channels are averaged, resampled to 16 kHz)")
    ints = _list_of(int, "integers")
    p.add_argument("--chunk", type=ints, metavar="C,...",
                   help=f"chunk sizes in frames (default: {_csv(DEFAULT_CHUNKS)}; with --dtype: 16)")
    p.add_argument("--left", type=ints, metavar="L,...",
                   help=f"attention left contexts in frames (default: {_csv(DEFAULT_LEFTS)}; with --dtype: 250)")
    p.add_argument("--lookahead", type=ints, metavar="P,...",
                   help=f"positional-conv lookaheads in frames, 0..63 (default: {_csv(DEFAULT_LOOKAHEADS)}; "
                        "with --dtype: 0)")
    p.add_argument("--norm", type=_list_of(NormPolicy, "policies (running, frozen)"), metavar="POLICY,...",
                   help="statistics policies (default: running,frozen for models with a GroupNorm front end "
                        "or waveform normalisation, else running: the policies coincide)")
    p.add_argument("--warmup", type=float, default=3.0, metavar="S",
                   help="seconds of statistics before the frozen policy stops updating "
                        "(default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=20.0, metavar="S",
                   help="use only the first S seconds of AUDIO; the offline reference is quadratic in length "
                        "(default: %(default)s; 0: all)")
    add_device_option(p)
    add_dtype_option(p, default=None, help="instead of streaming vs offline, compare this CPU precision "
                     "(bfloat16, int8, or auto's choice) with fp32, per layer, offline and streaming")
    p.add_argument("--png", default="fidelity.png", metavar="PATH", help="plot (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write every number (all layers) as JSON")
    p.set_defaults(func=fidelity)


def _model(name: str) -> tuple[WavLM, str, bool]:
    """The model, a description, and whether its weights are random."""
    if name == RANDOM:
        torch.manual_seed(0)
        return WavLM(WavLMConfig()), "RANDOM WEIGHTS (Base+-shaped, seed 0)", True
    return load_model(name), f"checkpoint {name}", False


def fidelity(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:  # a file or pipe gets the whole table instead of rich's 80 columns
        console.width = max(console.width, 120)
    device = resolve_device(args.device)
    wav = torch.from_numpy(load_audio(args.audio))  # before the model: bad audio fails fast
    model, description, random_weights = _model(args.checkpoint)
    model = model.to(device)
    total = wav.numel() / SAMPLE_RATE
    if args.max_seconds > 0:
        wav = wav[: int(args.max_seconds * SAMPLE_RATE)]
    frames = model.cfg.num_frames(wav.numel())
    if frames < 2:
        raise AudioError(f"{args.audio}: {wav.numel()} samples make {frames} frame(s); fidelity needs "
                         "at least 2 frames (45 ms)")
    if args.dtype is not None:
        return compare_precision(args, console, model, wav, description, random_weights)
    try:
        grid = settings_grid(model, args.chunk or DEFAULT_CHUNKS, args.left or DEFAULT_LEFTS,
                             args.lookahead or DEFAULT_LOOKAHEADS, args.norm, args.warmup)
    except ValueError as e:
        print(f"streamwavlm fidelity: error: {e}", file=sys.stderr)
        return 2
    seconds = wav.numel() / SAMPLE_RATE
    console.print(f"[bold]model[/]: {description}")
    if random_weights:
        console.print("[bold red]RANDOM WEIGHTS[/]: these numbers say nothing about a real checkpoint; run "
                      "`streamwavlm fidelity CHECKPOINT AUDIO` with the model you will deploy.")
    console.print(f"[bold]audio[/]: {args.audio} ({seconds:.2f} s of {total:.2f} s, {frames} frames)")
    if args.norm and not streams_statistics(model):
        console.print("note: this model has no GroupNorm front end or waveform normalisation, so the norm "
                      "policies give identical streams")
    start = time.perf_counter()
    with Bar(f"{len(grid)} settings", len(grid)) as bar:
        rows = measure(model, wav, grid, progress=lambda _row: bar.advance())
    elapsed = time.perf_counter() - start
    console.print(_table(rows, model.cfg.num_layers))
    console.print(f"{len(rows)} settings in {elapsed:.1f} s. *: on the latency/last-layer-cosine front "
                  "(no setting is both faster and closer). Latency is algorithmic; RTF is one stream on "
                  "this CPU.")
    png = plot(rows, args.png, title=f"{description} | {Path(args.audio).name}, {seconds:.1f} s")
    console.print(f"plot: {png}")
    if args.json:
        _write_json(args, rows, description, random_weights, seconds, frames, model.cfg.num_layers)
        console.print(f"json: {args.json}")
    return 0


def _table(rows: list[FidelityRow], num_layers: int) -> Table:
    mid = num_layers // 2
    table = Table(title="streaming vs offline (cosine: mean over frames; rel err: ||s - o|| / ||o||)")
    for col in ("", "C", "L", "P", "norm", "latency ms", "cos h0", f"cos h{mid}", f"cos h{num_layers}",
                "mean cos", "worst rel err", "RTF"):
        table.add_column(col, justify="left" if col == "norm" else "right", no_wrap=True)
    front = {id(r) for r in pareto_front(rows)}
    for r in rows:
        s = r.settings
        table.add_row("*" if id(r) in front else "", str(s.chunk), str(s.left), str(s.lookahead),
                      r.norm_label, f"{r.latency_ms:.0f}", f"{r.cosine[0]:.4f}", f"{r.cosine[mid]:.4f}",
                      f"{r.cosine[-1]:.4f}", f"{r.mean_cosine:.4f}", f"{r.worst_rel_error:.2e}",
                      f"{r.rtf:.3f}")
    return table


def _write_json(args: argparse.Namespace, rows: list[FidelityRow], description: str, random_weights: bool,
                seconds: float, frames: int, num_layers: int) -> None:
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "checkpoint": args.checkpoint, "model": description, "random_weights": random_weights,
        "audio": args.audio, "seconds": seconds, "frames": frames, "num_layers": num_layers,
        "threads": torch.get_num_threads(), "rows": [r.to_dict() for r in rows],
    }, indent=2))
