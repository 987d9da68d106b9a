"""``streamwavlm info``: what a checkpoint is, without running it."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..checkpoint import read_checkpoint, to_model_state
from ..precision import choose_auto, to_dict


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a checkpoint's format, config, parameter count and layer conventions")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="original .pt file or Hugging Face directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=info)


def describe(path: str) -> dict:
    raw = read_checkpoint(path)
    cfg = raw.config
    params = sum(t.numel() for t in to_model_state(raw).values())
    kind = "pre-LN (Large-type)" if cfg.layer_norm_first else "post-LN (Base-type)"
    return {
        "path": path,
        "format": raw.format,
        "variant": kind,
        "parameters": params,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extras"},
        "frame_rate_hz": 16000 / cfg.hop,
        "layer_outputs": (
            f"hidden_states[0..{cfg.num_layers}]: h_0 = encoder input after the positional conv"
            + ("" if cfg.layer_norm_first else " and the encoder LayerNorm")
            + "; h_i = output of layer i. "
            + ("h_L has NO final LayerNorm (transformers 5.x, unilm); last_hidden_state = LN(h_L) "
               "(transformers 4.x and s3prl put LN(h_L) in the last slot)."
               if cfg.layer_norm_first else "h_L = last_hidden_state in every convention.")
        ),
        "waveform_normalisation": (f"per utterance, eps {cfg.normalize_eps:g}" if cfg.normalize else "none"),
        "speaker_head": dataclasses.asdict(cfg.xvector) if cfg.xvector else None,
    }


def info(args: argparse.Namespace) -> int:
    d = describe(args.checkpoint)
    # what `--dtype auto` runs this checkpoint in on this machine, and why (docs/precision.md)
    d["cpu_precision"] = to_dict(choose_auto())
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    for key, value in d.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
    return 0
