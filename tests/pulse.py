"""A fake microphone for tests: a private user-mode PulseAudio whose source plays what we write to a FIFO.

PortAudio alone finds no device on a machine without a sound card. PulseAudio's ``module-pipe-source``
turns a FIFO into a capture source, and ALSA's ``pulse`` device (libasound2-plugins) exposes it to
PortAudio, so ``sounddevice.InputStream(device="pulse")`` records, bit for bit and at real-time pace,
what :class:`PulseMic` writes. A writer thread keeps the FIFO fed with silence between signals: if
nobody writes, PortAudio never completes a period and closing the stream hangs.

The server runs with its own runtime and home folders (no D-Bus, no user session) and is stopped by its
PID, so it touches nothing outside its folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

SOURCE = "fifomic"
PERIOD = 0.02  # seconds of audio per FIFO write


class PulseMic:
    """``start()``, then ``env`` for the client, ``play(int16 samples)``, ``stop()``."""

    def __init__(self, rate: int = 16000) -> None:
        self.rate = rate
        # Short path: the server's unix socket path must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="pa-"))
        self.fifo = self.root / "mic.fifo"
        self.socket = self.root / "runtime" / "pulse" / "native"
        self.proc: subprocess.Popen[bytes] | None = None
        self._queue: deque[np.ndarray] = deque()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.played = threading.Event()

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to record from the fake microphone."""
        return {"PULSE_SERVER": f"unix:{self.socket}", "PULSE_SOURCE": SOURCE}

    @property
    def log(self) -> str:
        path = self.root / "pulse.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        for d in ("runtime", "home"):
            (self.root / d).mkdir()
        script = self.root / "default.pa"
        script.write_text(
            "load-module module-native-protocol-unix auth-anonymous=1\n"
            "load-module module-null-sink sink_name=null\n"
            f"load-module module-pipe-source source_name={SOURCE} file={self.fifo} format=s16le "
            f"rate={self.rate} channels=1\n"
            f"set-default-source {SOURCE}\n")
        env = {**os.environ, "XDG_RUNTIME_DIR": str(self.root / "runtime"), "HOME": str(self.root / "home")}
        self.proc = subprocess.Popen(
            ["pulseaudio", "-n", "-F", str(script), "--daemonize=no", "--exit-idle-time=-1",
             "--disallow-exit", f"--log-target=file:{self.root / 'pulse.log'}"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not (self.socket.exists() and self.fifo.exists()):  # setup only: the server has no ready signal
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"PulseAudio did not come up; its log:\n{self.log}")
            time.sleep(0.01)
        self._writer = threading.Thread(target=self._write, name="pulse-fifo-writer", daemon=True)
        self._writer.start()

    def play(self, samples: np.ndarray) -> None:
        """Queue int16 mono samples; ``played`` is set once all queued samples are in the FIFO."""
        self.played.clear()
        self._queue.append(np.asarray(samples, dtype="<i2"))

    def _write(self) -> None:
        """Feed the FIFO one period at a time, on a fixed real-time schedule: queued audio, else silence."""
        fd = os.open(self.fifo, os.O_WRONLY)  # the server holds the FIFO open, so this does not block
        period = round(self.rate * PERIOD)
        silence = np.zeros(period, "<i2")
        pending = np.zeros(0, "<i2")
        try:
            t0, n = time.monotonic(), 0
            while not self._stop.is_set():
                if not len(pending) and self._queue:
                    pending = self._queue.popleft()
                block, pending = (pending[:period], pending[period:]) if len(pending) else (silence, pending)
                if len(block) < period:
                    block = np.concatenate([block, silence[len(block):]])
                os.write(fd, block.tobytes())
                if not len(pending) and not self._queue:
                    self.played.set()
                n += 1
                self._stop.wait(max(0.0, t0 + n * PERIOD - time.monotonic()))
        finally:
            os.close(fd)

    def crash(self) -> None:
        """The sound server dies (SIGKILL) under its clients; the FIFO writer is stopped first, quietly."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(5)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        """Stop the writer (after the recording stream is closed) and the server, by PID."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)
