"""Brokers for zero set-up and for tests: a managed ``mosquitto`` child process, and ``EmbeddedBroker``.

``EmbeddedBroker`` prefers mosquitto when its binary is installed (MQTT 5 and 3.1.1, ~40 ms to start, the
broker people run in production) and falls back to amqtt, a pure-Python in-process broker that speaks
only MQTT 3.1.1 and is 2-3x slower but needs nothing outside pip. The URL it yields carries
``?protocol=3.1.1`` for amqtt, so a Publisher or subscriber given that URL picks the protocol by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

log = logging.getLogger(__name__)

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """A broker could not be started or stopped; the message includes the broker's log tail."""


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, or in sbin (which is often not on a non-root PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race with another process is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class Mosquitto:
    """A mosquitto process on a loopback port, managed by PID: start, stop, kill and restart on the same port.

    ``persistence=True`` keeps sessions, queued QoS 1 messages and retained messages across a ``stop()`` /
    ``start()`` (mosquitto writes its database on SIGTERM), which is what a persistent-session subscriber
    needs to survive a broker restart. ``max_queued_messages`` bounds what mosquitto holds per client beyond
    the in-flight window (its default is 1000); messages past it are dropped by the broker.
    """

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", workdir: str | Path | None = None,
                 persistence: bool = False, max_queued_messages: int = 1000,
                 extra_config: Sequence[str] = (), binary: str | None = None) -> None:
        binary = binary or find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto, or run "
                              "scripts/setup.sh); EmbeddedBroker falls back to amqtt without it")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="streamwavlm-mosquitto-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.extra_config = tuple(extra_config)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def write_config(self) -> Path:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_file}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            f"max_queued_messages {self.max_queued_messages}",
            "set_tcp_nodelay true",  # embedding payloads are tens of KB: don't wait for the previous ACK
            *self.extra_config,
        ]
        if os.geteuid() == 0:
            # as root mosquitto otherwise drops to user "mosquitto", which cannot write our log file
            lines.append("user root")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("\n".join(lines) + "\n")
        return self.config_file

    def start(self, timeout: float = 5.0) -> None:
        """Start on ``self.port`` and return once it accepts TCP connections (or raise BrokerError)."""
        if self.pid is not None:
            raise BrokerError(f"mosquitto is already running (pid {self.pid})")
        self.write_config()
        self.process = subprocess.Popen([self.binary, "-c", str(self.config_file)], start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not _accepts(self.host, self.port):
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise BrokerError(f"mosquitto exited with code {self.process.returncode} on port "
                                  f"{self.port}: {err.strip()} {self.log_tail()}".strip())
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"mosquitto did not accept connections on {self.host}:{self.port} within "
                                  f"{timeout} s. {self.log_tail()}")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its persistence database), then SIGKILL if it does not exit in time."""
        if self.pid is None:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.resume()  # a paused broker handles SIGTERM only once it runs again
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def kill(self) -> None:
        """SIGKILL: a crash; nothing is saved."""
        if self.pid is None:
            return
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self._close_pipes()

    def pause(self) -> None:
        """SIGSTOP: a hung broker. TCP connections still complete (the kernel accepts them) but nothing is
        answered until ``resume()``."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def restart(self, timeout: float = 5.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "log: " + " | ".join(text) if text else ""

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _close_pipes(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class EmbeddedBroker:
    """``async with EmbeddedBroker() as url:`` a broker on 127.0.0.1 for the life of the block.

    ``backend="auto"`` takes mosquitto when installed, else amqtt (``pip install amqtt==0.12.1``);
    ``self.backend`` tells which one runs. The yielded URL is ``mqtt://127.0.0.1:PORT``, with
    ``?protocol=3.1.1`` appended for amqtt.
    """

    def __init__(self, *, backend: Literal["auto", "mosquitto", "amqtt"] = "auto", port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        if backend == "auto":
            backend = "mosquitto" if find_mosquitto() else "amqtt"
        if backend not in ("mosquitto", "amqtt"):
            raise ValueError(f"backend {backend!r} must be 'auto', 'mosquitto' or 'amqtt'")
        self.backend: Literal["mosquitto", "amqtt"] = backend
        self.host = host
        self.port = port or free_port(host)
        self._mosquitto: Mosquitto | None = None
        self._amqtt: Any = None

    @property
    def url(self) -> str:
        base = f"mqtt://{self.host}:{self.port}"
        return base + "?protocol=3.1.1" if self.backend == "amqtt" else base

    async def __aenter__(self) -> str:
        if self.backend == "mosquitto":
            self._mosquitto = Mosquitto(self.port, host=self.host)
            await asyncio.to_thread(self._mosquitto.start)
        else:
            self._amqtt = await _start_amqtt(self.host, self.port)
        return self.url

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._mosquitto is not None:
            await asyncio.to_thread(self._mosquitto.close)
            self._mosquitto = None
        if self._amqtt is not None:
            await self._amqtt.shutdown()
            self._amqtt = None


async def _start_amqtt(host: str, port: int) -> Any:
    try:
        from amqtt.broker import Broker
    except ImportError:
        raise BrokerError("no broker available: install mosquitto (apt-get install mosquitto) or amqtt "
                          "(pip install amqtt==0.12.1)") from None
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # only anonymous auth: the default plugin set also logs every packet and publishes $SYS topics
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    # amqtt (and its state machine library) log every connection at INFO; an embedded broker should stay
    # quiet unless something fails, or unless the application configured those loggers itself
    for name in ("amqtt", "transitions"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    broker = Broker(config)
    await broker.start()
    return broker
