"""The progress helper: a bar on a terminal, nothing at all otherwise."""

from __future__ import annotations

import io
import sys

import pytest

from streamwavlm.progress import Bar, HubBar, QuietHubBar


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_and_silent_elsewhere() -> None:
    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        with Bar("model.bin", 1000, unit="B", stream=stream) as bar:
            bar.advance(400)
            bar.update(1000)
    assert "model.bin" in tty.getvalue()
    assert pipe.getvalue() == ""


def test_hub_bar_takes_tqdm_increments(monkeypatch: pytest.MonkeyPatch) -> None:
    bar = HubBar(desc="pytorch_model.bin", total=100, initial=10, unit="B")
    with bar:
        bar.update(30)
        bar.update(None)
    assert bar.n == 40 and not bar.active  # stderr is not a terminal under pytest
    monkeypatch.setattr(sys, "stderr", Tty())  # on a terminal: the Hub bar shows, the quiet one still does not
    shown, quiet = HubBar(desc="x", total=1), QuietHubBar(desc="x", total=1)
    assert shown.active and not quiet.active
    shown.close()
