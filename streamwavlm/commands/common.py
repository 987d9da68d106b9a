"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import socket
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console

from ..checkpoint import model_from_setting
from ..config import WavLMConfig
from ..embedding import resolve_device
from ..model.wavlm import WavLM
from ..mqtt.connection import BrokerUnavailable, parse_broker_url
from ..streaming import NormPolicy, StreamSettings, XVectorSettings


def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", metavar="PATH|NAME",
        help="original .pt file, Hugging Face directory, model name (wavlm-base-plus, see `streamwavlm download "
             "--list`) or Hub id (microsoft/wavlm-base-plus), downloaded once into the cache (default: "
             "$STREAMWAVLM_CHECKPOINT, else random Base+-shaped weights)",
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda",
                        help="where the model runs: cpu, cuda or cuda:N (default: %(default)s)")


def _dtype(text: str) -> str:
    from ..precision import DTYPES

    if text == "float16":
        raise argparse.ArgumentTypeError("float16 is not a CPU compute precision; the payload type of "
                                         "`stream` is --payload-dtype float16")
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {', '.join(DTYPES)}")
    return text


def add_dtype_option(parser: argparse.ArgumentParser, default: str | None = "auto", help: str | None = None) -> None:
    parser.add_argument("--dtype", type=_dtype, default=default, metavar="float32|bfloat16|int8|auto",
                        help=help or "CPU compute precision; auto: the fastest this CPU runs natively, measured "
                                     "once and cached (docs/precision.md; default: %(default)s)")


def cpu_dtype(args: argparse.Namespace) -> str | None:
    """The ``--dtype`` to apply: precision paths are for the CPU; on a GPU the model stays as it is."""
    return args.dtype if getattr(args, "device", "cpu") in (None, "cpu") else None


def precision_line(model: torch.nn.Module) -> str:
    """``precision: ...`` for the start of a command: what runs, and why it was chosen."""
    from ..precision import precision_of, report

    return f"[bold]precision[/]: {report(precision_of(model))}"


N = TypeVar("N", int, float)
ONE_FRAME = WavLMConfig().receptive_field  # samples of the shortest input that makes a frame, in every WavLM


def positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    """An argparse type for a number that must be > 0 (a capacity, a backlog, a duration): 0 or less is
    refused when the arguments are read, before anything loads, rather than hanging or failing later."""
    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def check_reachable(url: str, timeout: float = 2.0) -> None:
    """Fail at once, in one line, when nothing listens at a broker URL (connection refused) or its host
    does not resolve; the MQTT connect that follows would retry those for its whole connect timeout. A
    host that does not answer at all is left to that connect and its timeout."""
    address = parse_broker_url(url)
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            pass
    except (ConnectionRefusedError, socket.gaierror) as e:
        raise BrokerUnavailable(
            f"cannot connect to MQTT broker {address.display}: {e.strerror or e} (is a broker running there? "
            f"start one with `mosquitto -p {address.port}`, or check the host and port)") from None
    except OSError:  # a timeout or an unreachable network: the MQTT connect decides, with its timeout
        pass


def bundled_sample() -> Path:
    """The speech sample shipped with the package (two synthetic voices, 11 s, 16 kHz mono)."""
    return Path(str(resources.files("streamwavlm") / "data" / "sample.wav"))


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_stream_options(parser: argparse.ArgumentParser) -> None:
    """The streaming settings every live command shares (see docs/streaming.md)."""
    g = parser.add_argument_group("streaming")
    g.add_argument("--chunk", type=int, default=16, help="frames per step, 20 ms each (default: %(default)s)")
    g.add_argument("--left", type=int, default=250, help="attention left context in frames (default: %(default)s)")
    g.add_argument("--lookahead", type=int, default=0,
                   help="positional-conv lookahead in frames, 0..63 (default: %(default)s)")
    g.add_argument("--norm", choices=[p.value for p in NormPolicy], default="running",
                   help="statistics policy for GroupNorm / waveform normalisation (default: %(default)s)")
    g.add_argument("--warmup", type=float, default=3.0, help="seconds before 'frozen' statistics freeze")
    g.add_argument("--layers", type=_int_list, default=(),
                   help="comma-separated hidden-state indices to emit (default: the last layer)")


def settings_from_args(args: argparse.Namespace, cfg: WavLMConfig) -> StreamSettings:
    settings = StreamSettings(chunk=args.chunk, left=args.left, lookahead=args.lookahead,
                              norm=NormPolicy(args.norm), warmup=args.warmup, layers=tuple(args.layers))
    settings.validate(cfg)
    return settings


def streaming_model(args: argparse.Namespace, console: Console) -> tuple[WavLM, StreamSettings, str]:
    """The model on its device, the streaming settings (with ``--xvector``) and the model id published with
    the embeddings, as every engine command (``stream``, ``worker``) loads them; says what it loaded."""
    model, description = model_from_setting(args.checkpoint, dtype=cpu_dtype(args))
    settings = settings_from_args(args, model.cfg)
    if args.xvector:
        settings = dataclasses.replace(settings, xvector=XVectorSettings(*args.xvector))
        settings.validate(model.cfg)
    model = model.to(resolve_device(args.device))
    console.print(f"[bold]model[/]: {description}")
    console.print(precision_line(model))
    return model, settings, Path(args.checkpoint).name if args.checkpoint else "random-base-plus"
