"""``streamwavlm convert``: between the original ``.pt`` format and Hugging Face directories."""

from __future__ import annotations

import argparse

from ..checkpoint import HF, ORIGINAL, convert


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between the original .pt and HF formats")
    p.add_argument("src", metavar="SRC", help="original .pt file or Hugging Face directory")
    p.add_argument("dst", metavar="DST", help="output .pt file (--to original) or directory (--to hf)")
    p.add_argument("--to", choices=(ORIGINAL, HF), required=True, help="output format")
    p.add_argument("--weight-norm", choices=("legacy", "parametrizations"), default="legacy",
                   help="HF spelling of the positional-conv weight norm: weight_g/weight_v (legacy, as on the "
                        "hub) or parametrizations.weight.original0/1")
    p.add_argument("--bin", action="store_true", help="write pytorch_model.bin instead of model.safetensors")
    p.add_argument("--backbone-only", action="store_true",
                   help="drop a speaker head (the original format cannot hold one)")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.dst, args.to, weight_norm=args.weight_norm, safetensors=not args.bin,
                  backbone_only=args.backbone_only)
    print(out)
    return 0
