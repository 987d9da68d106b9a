"""The ``streamwavlm`` command line: one subcommand per module, each registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# modules that define ``add_parser(subparsers)``; each parser sets ``func(args) -> int``
COMMAND_MODULES = (
    "streamwavlm.commands.run",
    "streamwavlm.commands.info",
    "streamwavlm.commands.convert",
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
