"""A user's mistake is one line on stderr and exit 2, said at once: never a traceback, never exit 0, never a
wait until ``--seconds``. Each case runs the real command line (``main([...])`` in this process, and the
installed ``streamwavlm`` in a subprocess for the entry point); real brokers, sockets and files, no mocks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamwavlm.cli import main
from streamwavlm.mqtt.broker import free_port

ROOT = Path(__file__).resolve().parents[1]


def _wav(path: Path, samples: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\1" * samples)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    (d / "text.wav").write_text("not audio\n")
    (d / "text.pt").write_text("not a checkpoint\n")
    (d / "in-the-way").write_text("a file where convert wants a folder\n")
    paths = {"text.wav": d / "text.wav", "text.pt": d / "text.pt", "missing": d / "missing.wav",
             "empty": _wav(d / "empty.wav", 0), "one": _wav(d / "one.wav", 1), "ok": _wav(d / "ok.wav", 16000),
             "unwritable": d / "in-the-way" / "out"}
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung broker, a wrong service)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of ``streamwavlm ARGV`` run in this process."""
    t0 = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refusing an option
        code = int(e.code or 0)
    return code, capsys.readouterr().err, time.monotonic() - t0


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("streamwavlm "), err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)


Case = Callable[[dict[str, str], int, int], list[str]]  # (files, a refused port, a silent port) -> argv

# (argv, what the line must say: the problem, and the fix where there is a short one), all refused before a
# model is loaded, so each takes well under a second here (most of the ~0.1 s is building the parser)
EARLY: dict[str, tuple[Case, tuple[str, ...]]] = {
    "run missing file": (lambda f, p, s: ["run", "--audio", f["missing"]], ("missing.wav", "no such file")),
    "info text as checkpoint": (lambda f, p, s: ["info", f["text.pt"]], ("text.pt", "corrupt", "download")),
    "info missing checkpoint": (lambda f, p, s: ["info", f["missing"]], ("missing.wav",)),
    "convert text as checkpoint": (lambda f, p, s: ["convert", f["text.pt"], f["unwritable"], "--to", "hf"],
                                   ("text.pt",)),
    "stream missing file": (lambda f, p, s: ["stream", "--input", f["missing"]], ("missing.wav",)),
    "stream text file": (lambda f, p, s: ["stream", "--input", f["text.wav"]], ("text.wav", "WAV/FLAC/OGG")),
    "stream empty wav": (lambda f, p, s: ["stream", "--input", f["empty"]], ("0 samples", "longer")),
    "stream one-sample wav": (lambda f, p, s: ["stream", "--input", f["one"]], ("1 samples", "at least 400")),
    "stream broker refused": (lambda f, p, s: ["stream", "--input", f["ok"], "--broker", f"mqtt://127.0.0.1:{p}"],
                              ("127.0.0.1", "refused", "mosquitto -p")),
    "stream broker bad url": (lambda f, p, s: ["stream", "--input", f["ok"], "--broker", "http://x"],
                              ("scheme", "mqtt://host")),
    "stream input broker refused": (lambda f, p, s: ["stream", "--input", f"mqtt://127.0.0.1:{p}",
                                                         "--seconds", "30"], ("refused", "mosquitto -p")),
    "stream ws port out of range": (lambda f, p, s: ["stream", "--input", "ws://127.0.0.1:99999",
                                                         "--seconds", "30"], ("99999", "65535")),
    "stream no such microphone": (lambda f, p, s: ["stream", "--input", "mic:no-such-device"], ("device",)),
    "stream capacity 0": (lambda f, p, s: ["stream", "--capacity", "0"], ("--capacity", "greater than 0")),
    "stream max-backlog 0": (lambda f, p, s: ["stream", "--max-backlog", "0"], ("--max-backlog", "than 0")),
    "stream max-backlog -1": (lambda f, p, s: ["stream", "--max-backlog", "-1"], ("--max-backlog",)),
    "stream xvector 150": (lambda f, p, s: ["stream", "--xvector", "150"], ("WINDOW,HOP", "150,50")),
    "stream xvector 0,5": (lambda f, p, s: ["stream", "--xvector", "0,5"], ("positive",)),
    "stream seconds 0": (lambda f, p, s: ["stream", "--seconds", "0"], ("--seconds",)),
    "listen broker refused": (lambda f, p, s: ["listen", "--broker", f"mqtt://127.0.0.1:{p}", "--timeout", "3"],
                              ("refused", "mosquitto -p")),
    "listen broker silent": (lambda f, p, s: ["listen", "--broker", f"mqtt://127.0.0.1:{s}", "--timeout", "1"],
                             ("no connection", "within --timeout 1 s")),
}


@pytest.mark.parametrize("name", list(EARLY))
def test_refused_at_once_in_one_line(name: str, files: dict[str, str], silent_port: int,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv, needles = EARLY[name]
    code, err, seconds = run_cli(argv(files, free_port(), silent_port), capsys)
    assert_one_line(code, err, *needles)
    assert seconds < 3.0, f"{name}: {seconds:.1f} s"


@pytest.fixture(scope="module")
def tiny(hf_models: dict) -> str:
    return str(hf_models["base"][1])


def test_refused_after_the_model_loads_in_one_line(tiny: str, files: dict[str, str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """What needs the model's settings: a chunk of 0 frames, audio too short for one frame (``run``), a
    destination that cannot be written (``convert``); still one line, within seconds."""
    cases = [
        (["stream", "--checkpoint", tiny, "--chunk", "0"], ("chunk",)),
        (["run", "--checkpoint", tiny, "--audio", files["empty"]], ("empty.wav", "too short")),
        (["run", "--checkpoint", tiny, "--audio", files["one"]], ("one.wav", "too short")),
        (["run", "--checkpoint", tiny, "--audio", files["text.wav"]], ("text.wav",)),
        (["convert", tiny, files["unwritable"], "--to", "original"], ("in-the-way", "check the path")),
    ]
    for argv, needles in cases:
        code, err, seconds = run_cli(argv, capsys)
        assert_one_line(code, err, *needles)
        assert seconds < 10, (argv, seconds)


def test_websocket_port_in_use_is_said_at_start_not_at_seconds(tiny: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, err, seconds = run_cli(["stream", "--checkpoint", tiny, "--broker", "none", "--save", "/dev/null",
                                      "--input", f"ws://127.0.0.1:{port}", "--seconds", "60"], capsys)
    assert_one_line(code, err, str(port))
    assert seconds < 15, seconds  # not at --seconds 60


def test_installed_entry_point_refuses_an_unreachable_broker_in_one_line(files: dict[str, str]) -> None:
    """The real ``streamwavlm`` executable (this case was a traceback, after a 10 s wait)."""
    exe = shutil.which("streamwavlm", path=str(ROOT / ".venv" / "bin")) or shutil.which("streamwavlm")
    if exe is None:
        pytest.skip("the streamwavlm entry point is not installed")
    t0 = time.monotonic()
    proc = subprocess.run([exe, "stream", "--input", files["ok"], "--broker", f"mqtt://127.0.0.1:{free_port()}",
                           "--seconds", "30"], capture_output=True, text=True, timeout=60)
    assert_one_line(proc.returncode, proc.stderr, "refused")
    assert time.monotonic() - t0 < 30  # imports only (a few seconds), no broker wait, no --seconds


@pytest.mark.parametrize("broker,needle", [("http://x", "scheme 'http'"), ("refused", "refused")])
def test_mqtt_stream_demo_refuses_a_bad_broker_in_one_line(broker: str, needle: str) -> None:
    """The demo's own command line: a malformed URL (was a traceback) or nothing listening (was a 15 s wait
    and a message wrapped over several lines of stdout)."""
    url = f"mqtt://127.0.0.1:{free_port()}" if broker == "refused" else broker
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "demos" / "mqtt_stream.py"), "--broker", url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("mqtt_stream: ") and proc.stderr.count("\n") == 1 and needle in proc.stderr
    assert time.monotonic() - t0 < 30  # imports only
