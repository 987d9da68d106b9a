"""The live microphone demo in a real terminal (tmux) against the PulseAudio fake microphone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    sock = str(tmp_path / "tmux.sock")
    yield ["tmux", "-S", sock]
    subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)


def screen(tmux) -> str:
    return subprocess.run([*tmux, "capture-pane", "-p", "-t", "demo"], capture_output=True, text=True).stdout


def wait_for(tmux, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = screen(tmux)
        if text in s:
            return s
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear; screen:\n{screen(tmux)}")


def test_live_demo_shows_levels_and_latency_and_stops_on_ctrl_c(tmux, pulse_mic, speech, tmp_path):
    env = {**os.environ, **pulse_mic.env, "COLUMNS": "120", "LINES": "30"}
    done = tmp_path / "exit-code"
    cmd = (f"{sys.executable} {ROOT / 'demos' / 'live_mic.py'} --device pulse --chunk 8 --left 50; "
           f"echo $? > {done}")
    subprocess.run([*tmux, "new-session", "-d", "-s", "demo", "-x", "120", "-y", "30", cmd], env=env, check=True)
    wait_for(tmux, "input level", 60)
    pulse_mic.play((speech.numpy() * 32767).astype(np.int16))
    time.sleep(2.5)
    s = wait_for(tmux, "chunk latency", 10)
    level = re.search(r"input level\W+(-?[0-9.]+) dBFS", s)
    assert level and float(level.group(1)) > -60, s  # the speech is being heard
    frames = re.search(r"frames\W+([0-9]+)", s)
    assert frames and int(frames.group(1)) > 0, s
    subprocess.run([*tmux, "send-keys", "-t", "demo", "C-c"], check=True)
    deadline = time.monotonic() + 20
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert done.exists(), screen(tmux)
    assert done.read_text().strip() == "0", screen(tmux)


def test_no_input_devices_is_said_in_one_line(tmp_path):
    """Without a sound card or sound server (PortAudio sees no input): --list-devices says so, and running
    the demo is one line and a non-zero exit, not a traceback."""
    env = {**os.environ, "PULSE_SERVER": f"unix:{tmp_path}/none", "XDG_RUNTIME_DIR": str(tmp_path)}
    code = "from streamwavlm.audio.microphone import list_devices; print(len(list_devices()))"
    if subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() != "0":
        pytest.skip("this machine has input devices")
    listed = subprocess.run([sys.executable, str(ROOT / "demos" / "live_mic.py"), "--list-devices"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert listed.returncode == 1 and listed.stdout == ""
    assert listed.stderr.startswith("no input devices") and listed.stderr.count("\n") == 1
    run = subprocess.run([sys.executable, str(ROOT / "demos" / "live_mic.py"), "--seconds", "1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and "no input device" in run.stderr
