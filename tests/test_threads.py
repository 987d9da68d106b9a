"""Small steps on one thread (model/threads.py): the same results, the thread count restored, other threads
untouched."""

from __future__ import annotations

import threading

import pytest
import torch

from streamwavlm.checkpoint import load_model
from streamwavlm.model import threads
from streamwavlm.precision import missing, set_precision
from streamwavlm.streaming import StreamPool, StreamSettings


@pytest.fixture
def passive(monkeypatch):
    """Act as under OMP_WAIT_POLICY=passive (read once at import) with two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "PASSIVE", True)
    yield
    torch.set_num_threads(before)


def test_serial_inside_all_threads_around_products(passive):
    with threads.serial(16):
        assert torch.get_num_threads() == 1
        with threads.all_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads.serial(threads.SERIAL_ROWS + 1):  # a large call keeps every thread
        assert torch.get_num_threads() == 2


def test_serial_only_with_passive_threads(monkeypatch):
    monkeypatch.setattr(threads, "PASSIVE", False)
    torch.set_num_threads(2)
    with threads.serial(1):
        assert torch.get_num_threads() == 2


def test_a_thread_already_running_keeps_its_threads(passive):
    seen: list[int] = []
    started, checked = threading.Event(), threading.Event()

    def other() -> None:
        torch.get_num_threads()  # this thread has used torch before the small step starts
        started.set()
        checked.wait()
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=other)
    worker.start()
    started.wait()
    with threads.serial(16):
        checked.set()
        worker.join()
    assert seen == [2]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_one_stream_serial_equals_parallel_bitwise(passive, monkeypatch, hf_models, speech, dtype):
    if missing(dtype) is not None:
        pytest.skip(f"{dtype} is not native on this CPU: {missing(dtype)}")
    model = load_model(hf_models["base"][1])
    set_precision(model, dtype)
    settings = StreamSettings(chunk=8, left=40)
    frames = []
    for rows in (0, threads.SERIAL_ROWS):  # every call on all threads, then small calls serialised
        monkeypatch.setattr(threads, "SERIAL_ROWS", rows)
        pool = StreamPool(model, settings)
        slot = pool.open("s")
        pos, out = 0, []
        while pos + pool.need(slot) <= len(speech):
            n = pool.need(slot)
            out += pool.step({slot: speech[pos:pos + n]})
            pos += n
        frames.append(torch.cat([o.frames for o in out], 1))
    assert len(frames[0]) and torch.equal(frames[0], frames[1])
