"""The engine's per-stream sample queue: views, gap fill, drops, and the one ledger of every sample."""

from __future__ import annotations

import numpy as np
import pytest

from streamwavlm.audio.queue import SampleQueue


def test_steps_are_views_within_a_piece_and_joined_across_pieces():
    q = SampleQueue()
    a, b = np.arange(10, dtype=np.float32), np.arange(10, 20, dtype=np.float32)
    q.put(a, 0, arrival=1.0)
    q.put(b, 10, arrival=2.0)
    first = q.take(4)
    assert np.shares_memory(first, a) and first.tolist() == [0, 1, 2, 3] and q.last_arrival == 1.0
    joined = q.take(10)  # 6 from a, 4 from b: one copy
    assert not np.shares_memory(joined, a) and joined.tolist() == list(range(4, 14)) and q.last_arrival == 2.0
    assert len(q) == 6 and q.take(0).size == 0 and len(q) == 6
    with pytest.raises(ValueError, match="7 samples asked for, 6 queued"):
        q.take(7)


def test_gaps_are_filled_with_silence_and_drops_shift_stream_time():
    q = SampleQueue()
    q.put(np.ones(5, np.float32), 0)
    q.put(np.ones(5, np.float32), 8)  # the source lost 3 samples
    assert q.gap_filled == 3 and q.take(13).tolist() == [1] * 5 + [0] * 3 + [1] * 5
    q.put(np.full(20, 2.0, np.float32))
    assert q.drop_oldest(6) == 6 and q.drop_oldest(100) == 14 and len(q) == 0
    q.put(np.full(4, 3.0, np.float32))
    assert q.take(4).tolist() == [3.0] * 4
    assert q.stream_index(10) == 10  # taken before the drops: unshifted
    assert q.stream_index(13) == 13 + 20  # the first sample after 20 dropped ones
    assert q.received + q.gap_filled == q.taken + q.dropped + len(q) == 37
