"""Brokers for zero set-up and for tests: a managed ``mosquitto`` child process, and ``EmbeddedBroker``.

``EmbeddedBroker`` prefers mosquitto when its binary is installed (MQTT 5 and 3.1.1, ~40 ms to start, the
broker people run in production) and falls back to amqtt, a pure-Python in-process broker that speaks
only MQTT 3.1.1 and is 2-3x slower but needs nothing outside pip. The URL it yields carries
``?protocol=3.1.1`` for amqtt, so a Publisher or subscriber given that URL picks the protocol by itself.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
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


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it ends


def _die_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its starting thread (in the parent) ends,
    SIGKILL of the whole process included; mosquitto exits on SIGTERM. None where there is no prctl (not
    Linux): there the child is stopped only by ``stop()``. prctl is looked up here, in the parent: between
    fork and exec the child should do as little as possible."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


class Mosquitto:
    """A mosquitto process on a loopback port, managed by PID: start, stop, kill and restart on the same port.

    ``persistence=True`` keeps sessions, queued QoS 1 messages and retained messages across a ``stop()`` /
    ``start()`` (mosquitto writes its database on SIGTERM), which is what a persistent-session subscriber
    needs to survive a broker restart. ``max_queued_messages`` bounds what mosquitto holds per client beyond
    the in-flight window (its default is 1000); messages past it are dropped by the broker.

    ``die_with_parent=True`` ties the broker's life to the thread that calls ``start()`` (Linux
    ``PR_SET_PDEATHSIG``): if that thread or the whole process ends, even by SIGKILL, the broker gets
    SIGTERM. Start it from a thread that lives as long as the broker (the event loop's, not a worker's).
    """

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", workdir: str | Path | None = None,
                 persistence: bool = False, max_queued_messages: int = 1000,
                 extra_config: Sequence[str] = (), binary: str | None = None,
                 die_with_parent: bool = False) -> None:
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
        self.die_with_parent = die_with_parent
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
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process and return at once (``wait_ready`` waits for its port)."""
        if self.pid is not None:
            raise BrokerError(f"mosquitto is already running (pid {self.pid})")
        self.write_config()
        # its own session: a Ctrl-C on the terminal goes to us, and we stop the broker in order
        self.process = subprocess.Popen([self.binary, "-c", str(self.config_file)], start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        preexec_fn=_die_with(os.getpid()) if self.die_with_parent else None)

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Return once the started process accepts TCP connections (or raise BrokerError)."""
        assert self.process is not None, "spawn() first"
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
            # spawned from the event loop's thread, which outlives the block: the broker dies with it
            self._mosquitto = Mosquitto(self.port, host=self.host, die_with_parent=True)
            self._mosquitto.spawn()
            try:
                await asyncio.to_thread(self._mosquitto.wait_ready)
            except BaseException:  # failed, or cancelled (Ctrl-C while starting): nothing may be left
                self.kill()
                raise
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

    def kill(self) -> None:
        """For a process that must exit now (see ``commands.signals``): SIGKILL the mosquitto broker and
        remove its folder, synchronously. An amqtt broker lives in our process and ends with it."""
        if self._mosquitto is not None:
            self._mosquitto.kill()
            self._mosquitto.close()
            self._mosquitto = None


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
