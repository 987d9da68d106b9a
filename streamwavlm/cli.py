"""The ``streamwavlm`` command line: one subcommand per module, each registering its own parser.

This module imports only the standard library at the top: :func:`main` takes Ctrl-C over first and only then
imports the commands (torch and the rest, seconds), so that a Ctrl-C while they load is one line too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from .commands.signals import exit_now, guarded, rename

# modules that define ``add_parser(subparsers)``; each parser sets ``func(args) -> int``
COMMAND_MODULES = (
    "streamwavlm.commands.stream",
    "streamwavlm.commands.worker",
    "streamwavlm.commands.run",
    "streamwavlm.commands.embed",
    "streamwavlm.commands.info",
    "streamwavlm.commands.convert",
    "streamwavlm.commands.fidelity",
    "streamwavlm.commands.listen",
    "streamwavlm.commands.diarize",
    "streamwavlm.commands.enroll",
    "streamwavlm.commands.background",
    "streamwavlm.commands.der",
    "streamwavlm.download",
)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: what was wrong, and where the options are described (argparse
    would print the whole usage first). Subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="streamwavlm", description="Streaming, real-time WavLM audio embeddings.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """What a user's mistake or environment raises (a bad file, setting or broker): one line on stderr, exit
    2. OSError covers unreadable and unwritable paths, and BrokerUnavailable (a ConnectionError)."""
    from .audio.validate import AudioError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .mqtt.broker import BrokerError

    return CheckpointError, ConfigError, AudioError, ValueError, BrokerError, OSError


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error is one line on stderr and exit 2, never a traceback; Ctrl-C or SIGTERM
    ends any command within 2 s (exit 130/143, or 0 where the command stops cleanly, like ``stream``)."""
    prog = "streamwavlm"
    with guarded(prog) as signalled:
        try:
            parser = build_parser()  # imports every command: torch, ... (seconds)
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            prog = f"streamwavlm {args.command}"
            rename(prog)
            code = _run(args, prog)
        except KeyboardInterrupt:  # before the command took the signal over, or a synchronous command
            print(f"{prog}: interrupted", file=sys.stderr)
            code = 130
    if signalled():  # stopped by Ctrl-C or SIGTERM, and cleaned up: leave now
        exit_now(code)
    return code


def _run(args: argparse.Namespace, prog: str) -> int:
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line; a file-system error names the path and the usual fix."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror.lower()}; check the path and its permissions"
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
