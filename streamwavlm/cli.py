"""The ``streamwavlm`` command line: one subcommand per module, each registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

from .audio.validate import AudioError
from .checkpoint import CheckpointError
from .config import ConfigError

# modules that define ``add_parser(subparsers)``; each parser sets ``func(args) -> int``
COMMAND_MODULES = (
    "streamwavlm.commands.stream",
    "streamwavlm.commands.run",
    "streamwavlm.commands.embed",
    "streamwavlm.commands.info",
    "streamwavlm.commands.convert",
    "streamwavlm.commands.fidelity",
    "streamwavlm.commands.listen",
    "streamwavlm.download",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamwavlm", description="Streaming, real-time WavLM audio embeddings."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, ConfigError, AudioError, ValueError) as e:
        print(f"streamwavlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
