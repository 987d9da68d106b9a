"""The MQTT stream demo in a real terminal (tmux): with ``--demo`` it starts a broker and the stream command
in-process, and its live view shows the stream's messages and latency; Ctrl-C and ``--seconds`` stop it
cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_demo_live_mic as terminal

from streamwavlm.mqtt.broker import find_mosquitto

tmux = terminal.tmux  # the fixture: a tmux server on a private socket
screen, wait_for = terminal.screen, terminal.wait_for

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demos" / "mqtt_stream.py"
# the row of stream 'sample': stream, state, messages, frames, gaps (lost), latency p50, latency p99
ROW = re.compile(r"^sample +(\S+) +(\d+) +(\d+) +(\d+) \((\d+)\) +(\d+) +(\d+) ", re.M)


@pytest.fixture(autouse=True)
def _needs_mosquitto():
    # the embedded broker would fall back to amqtt, which works but is not what this test is about
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")


def row(tmux, timeout: float) -> re.Match[str]:
    """The stream's row once it shows a latency (the first message has arrived)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ROW.search(screen(tmux))
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"no row for stream 'sample'; screen:\n{screen(tmux)}")


def test_demo_shows_the_stream_growing_and_stops_on_ctrl_c(tmux, hf_models, tmp_path):
    _, checkpoint = hf_models["base"]
    done = tmp_path / "exit-code"
    # the pane outlives the demo (sleep) so that its last screen can be read
    cmd = f"{sys.executable} {DEMO} --demo --checkpoint {checkpoint} --chunk 8; echo $? > {done}; sleep 60"
    env = {**os.environ, "COLUMNS": "140", "LINES": "45"}
    subprocess.run([*tmux, "new-session", "-d", "-s", "demo", "-x", "140", "-y", "45", cmd], env=env, check=True)
    wait_for(tmux, "streamwavlm MQTT stream view", 60)
    first = row(tmux, 30)
    time.sleep(1.5)
    later = row(tmux, 5)
    s = screen(tmux)
    assert later.group(1) == "online", s
    assert int(later.group(2)) > int(first.group(2)) > 0, s  # messages keep arriving (8 frames each)
    assert 8 * (int(later.group(2)) - 1) < int(later.group(3)) <= 8 * int(later.group(2)), s  # (a last one short)
    assert later.group(4) == "0", s  # no gaps
    assert 0 <= int(later.group(6)) <= int(later.group(7)) < 2000, s  # latency p50 <= p99, plausible
    assert re.search(r"sample: last \d+ chunks", s) and "█" in s, s  # self-similarity (diagonal 1: █)
    assert "model: checkpoint" in s, s  # the in-process publisher's output, inside the view
    subprocess.run([*tmux, "send-keys", "-t", "demo", "C-c"], check=True)
    deadline = time.monotonic() + 20
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert done.exists(), screen(tmux)
    assert done.read_text().strip() == "0", screen(tmux)
    s = screen(tmux)
    assert "stopped cleanly: sample:" in s and "Traceback" not in s, s
    assert ROW.search(s) and ROW.search(s).group(1) == "offline", s  # the publisher marked it offline


def test_demo_stops_after_seconds(hf_models):
    _, checkpoint = hf_models["base"]
    proc = subprocess.run([sys.executable, str(DEMO), "--demo", "--checkpoint", str(checkpoint), "--chunk", "8",
                           "--seconds", "3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"stopped cleanly: sample: (\d+) messages, (\d+) frames, 0 gaps", proc.stdout)
    assert m and int(m.group(1)) > 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("width", [80, 120])
def test_view_fits_80_and_120_columns(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every line fits the terminal, and no column heading is cut short."""
    import io

    monkeypatch.syspath_prepend(str(ROOT / "demos"))

    import numpy as np
    from mqtt_stream import View
    from rich.console import Console

    from streamwavlm.mqtt import EmbeddingMessage

    view = View("mqtt://127.0.0.1:41234 streamwavlm/+/embeddings", 16, "streamwavlm stream --input sample.wav "
                "--realtime (looped) -> mqtt://127.0.0.1:41234")
    rng = np.random.default_rng(0)
    for sid in ("sample", "a-rather-long-stream-identifier"):
        for i in range(40):
            view.add(EmbeddingMessage(sid, "embeddings", i, 16 * i, 50.0, time.time() - 0.2, "m", (12,),
                                      rng.standard_normal((1, 16, 768)).astype(np.float32)))
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(view.render(width))
    lines = out.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    heading = next(line for line in lines if "stream" in line and "p50" in line)
    for name in ("state", "msgs", "frames", "gaps", "p99", "novelty"):
        assert f" {name} " in heading + " ", heading
    assert ("payload" in heading) == (width >= 110)
    assert ROW.search(next(line + " " for line in lines if line.startswith("sample ")))
