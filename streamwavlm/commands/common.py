"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path


def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", metavar="PATH",
        help="original .pt file or Hugging Face directory (default: $STREAMWAVLM_CHECKPOINT, else random "
             "Base+-shaped weights)",
    )


def bundled_sample() -> Path:
    """The speech sample shipped with the package (two synthetic voices, 11 s, 16 kHz mono)."""
    return Path(str(resources.files("streamwavlm") / "data" / "sample.wav"))
