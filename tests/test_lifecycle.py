"""Process lifecycle with real processes and real signals: Ctrl-C (SIGINT) and SIGTERM end a command within
2 s and leave nothing behind (the embedded broker stopped, its folder removed); an owner killed with SIGKILL
takes its embedded broker with it; a command stuck in a long computation is still ended in time; a lost
microphone (the sound server killed mid-stream) ends ``stream`` with one line and a non-zero exit."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path

import psutil
import pytest

from streamwavlm.mqtt import Mosquitto
from streamwavlm.mqtt.broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\1" * 16000 * 60)
    return str(path)


@pytest.fixture(scope="module")
def tiny(hf_models: dict) -> str:
    return str(hf_models["base"][1])


class Command:
    """``python -m streamwavlm.cli ARGS`` with its output read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "streamwavlm.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env or ENV)
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Read stdout until a line matches (the process must still be running)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        self.proc.kill()
        raise AssertionError(f"no {pattern!r} in {self.lines}; stderr: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def signal_and_time(self, signum: int, timeout: float = 30) -> tuple[int, float, str]:
        """Send ``signum``; (exit code, seconds until the process ended, stderr)."""
        t0 = time.monotonic()
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - t0, self.proc.stderr.read()  # type: ignore[union-attr]

    def embedded_broker(self) -> tuple[psutil.Process, Path]:
        """The mosquitto child and the folder its config is in."""
        brokers = [c for c in psutil.Process(self.proc.pid).children() if c.name() == "mosquitto"]
        assert len(brokers) == 1, brokers
        config = Path(brokers[0].cmdline()[-1])
        assert config.name == "mosquitto.conf" and config.exists()
        return brokers[0], config.parent


def gone(process: psutil.Process, timeout: float) -> bool:
    """True once the process has exited (a zombie no one reaps counts as exited)."""
    deadline = time.monotonic() + timeout
    while True:  # looked at least once, so that gone(p, 0) is "has it exited now"
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


@needs_mosquitto
@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.heavy)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_stops_stream_cleanly_within_2s_and_removes_the_embedded_broker(
        signum: int, tiny: str, long_wav: str, spawned: list[Command]) -> None:
    c = Command("stream", "--checkpoint", tiny, "--dtype", "float32", "--input", long_wav, "--realtime",
                "--chunk", "25")
    spawned.append(c)
    c.wait_for(r"^streaming: ")
    broker, folder = c.embedded_broker()
    time.sleep(1.0)  # audio is flowing
    code, seconds, err = c.signal_and_time(signum)
    assert code == 0 and "Traceback" not in err, err  # a clean stop: flushed, summary printed
    assert seconds < 2.0, seconds
    assert gone(broker, 0.5) and not folder.exists()
    assert "long: " in c.proc.stdout.read()  # type: ignore[union-attr]  # the per-stream summary


@needs_mosquitto
def test_sigkill_of_the_owner_takes_the_embedded_broker_with_it(tiny: str, long_wav: str,
                                                                 spawned: list[Command]) -> None:
    c = Command("stream", "--checkpoint", tiny, "--dtype", "float32", "--input", long_wav, "--realtime")
    spawned.append(c)
    c.wait_for(r"^broker: embedded, mqtt://")
    broker, folder = c.embedded_broker()
    t0 = time.monotonic()
    c.proc.kill()
    c.proc.wait()
    try:
        assert gone(broker, 2.0), "the embedded broker outlived its owner"
        assert time.monotonic() - t0 < 2.0
    finally:
        broker_alive = not gone(broker, 0)
        if broker_alive:
            broker.kill()
        shutil.rmtree(folder, ignore_errors=True)  # SIGKILL leaves the (small) folder behind


@needs_mosquitto
def test_ctrl_c_ends_listen_within_2s(mosquitto: Mosquitto, spawned: list[Command]) -> None:
    c = Command("listen", "--broker", mosquitto.url)
    spawned.append(c)
    deadline = time.monotonic() + 60
    # listen prints nothing until a message comes: wait until its client is connected to the broker
    while "New client connected" not in mosquitto.log_file.read_text(errors="replace"):
        assert time.monotonic() < deadline and c.proc.poll() is None, c.proc.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.05)
    code, seconds, err = c.signal_and_time(signal.SIGINT)
    assert code == 0 and err == "" and seconds < 2.0, (code, seconds, err)


STUCK = textwrap.dedent("""
    import asyncio, sys, time
    from streamwavlm.commands.signals import guarded, stop_event

    async def command():
        stop = stop_event()
        print("running", flush=True)
        await stop.wait()
        time.sleep(30)  # a stop that does not finish: the event loop blocked in a long computation

    with guarded("stuck"):
        asyncio.run(command())
""")


def test_a_command_stuck_after_ctrl_c_is_still_ended_within_2s() -> None:
    """The watchdog: the first signal asks for a clean stop; if the command is still there 1.5 s later it
    is ended (128 + signal number) with one line."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "running\n"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert code == 130 and 1.4 < seconds < 2.0, (code, seconds)
    assert err == "stuck: stopped by SIGINT (did not finish cleanly within 1.5 s)\n", err


@pytest.mark.heavy
def test_stream_from_the_microphone_stops_on_ctrl_c_within_2s(pulse_mic, tiny: str,
                                                               spawned: list[Command]) -> None:
    c = Command("stream", "--checkpoint", tiny, "--dtype", "float32", "--input", "mic:pulse", "--broker", "none",
                "--save", os.devnull, env={**ENV, **pulse_mic.env})
    spawned.append(c)
    c.wait_for(r"^streaming: ")
    time.sleep(1.0)
    code, seconds, err = c.signal_and_time(signal.SIGINT)
    assert code == 0 and "Traceback" not in err and seconds < 2.0, (code, seconds, err)


def test_microphone_lost_mid_stream_ends_stream_non_zero_in_one_line(pulse_mic, tiny: str,
                                                                     spawned: list[Command]) -> None:
    """The sound server dies while ``stream --input mic`` records: the run ends at once, exit 2, and its
    last stderr line says the microphone was lost (PortAudio's own ALSA diagnostics may come before it)."""
    c = Command("stream", "--checkpoint", tiny, "--dtype", "float32", "--input", "mic:pulse", "--broker", "none",
                "--save", os.devnull, "--seconds", "60", env={**ENV, **pulse_mic.env})
    spawned.append(c)
    c.wait_for(r"^streaming: ")
    time.sleep(1.0)
    t0 = time.monotonic()
    pulse_mic.crash()
    code = c.proc.wait(30)
    seconds = time.monotonic() - t0
    err = c.proc.stderr.read()  # type: ignore[union-attr]
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("streamwavlm stream: error: mic: microphone lost") and "start again" in last, err
    assert seconds < 5.0, seconds  # not at --seconds 60


def recording(pulse_env: dict[str, str]) -> bool:
    """Whether a client records from the fake microphone's PulseAudio server now."""
    listed = subprocess.run(["pactl", "list", "short", "source-outputs"], capture_output=True, text=True,
                            env={**os.environ, **pulse_env}, timeout=10)
    return bool(listed.stdout.strip())


@pytest.mark.heavy
def test_live_mic_demo_says_microphone_lost_in_one_line(pulse_mic, tiny: str) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "demos" / "live_mic.py"), "--device", "pulse",
                             "--checkpoint", tiny, "--seconds", "60"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **pulse_mic.env})
    try:
        deadline = time.monotonic() + 60
        while not recording(pulse_mic.env):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.2)
        time.sleep(1.0)
        pulse_mic.crash()
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("live_mic: microphone lost"), err


def test_ctrl_c_while_the_command_line_loads_is_one_line() -> None:
    """Ctrl-C during the seconds the commands take to import (torch): not a KeyboardInterrupt traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "streamwavlm.cli", "stream", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(1.0)  # past the interpreter's start (~0.1 s), inside the imports (several seconds)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(10)
    seconds = time.monotonic() - t0
    out, err = proc.communicate()
    if out:  # this machine imported everything within a second: nothing to test
        pytest.skip("the imports finished before the signal")
    # 130, or ended by the signal itself (-SIGINT: Python re-raises an interrupt it did not absorb at exit);
    # a shell shows both as 130. What must hold: one line, no traceback, quickly.
    assert code in (130, -signal.SIGINT), (code, err, seconds)
    assert err == "streamwavlm: interrupted\n" and seconds < 2.0, (code, err, seconds)
