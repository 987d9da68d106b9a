"""DER / JER against pyannote.metrics (the reference implementation), RTTM parsing, the ``der`` command."""

from __future__ import annotations

import random
import warnings

import pytest

from streamwavlm.cli import main
from streamwavlm.diarization.der import Score, score
from streamwavlm.diarization.rttm import RttmError, Segment, format_rttm, parse_rttm

pyannote_metrics = pytest.importorskip("pyannote.metrics.diarization")


def _random_turns(rng: random.Random, speakers: list[str], n: int, span: float = 60.0) -> list[Segment]:
    out = []
    for _ in range(n):
        start = round(rng.uniform(0, span), 3)
        out.append(Segment(start, round(start + rng.uniform(0.05, 8.0), 3), rng.choice(speakers)))
    return out


def _annotation(turns: list[Segment]):
    from pyannote.core import Annotation
    from pyannote.core import Segment as PSegment

    a = Annotation()
    for i, t in enumerate(turns):
        a[PSegment(t.start, t.end), i] = t.speaker
    return a


@pytest.mark.parametrize("collar,skip_overlap", [(0.0, False), (0.25, False), (0.5, True), (0.0, True)])
def test_der_and_jer_equal_pyannote(collar, skip_overlap):
    """Random pairs with overlapping speech, same-speaker overlaps, unmatched and missing speakers; per file
    and accumulated over files."""
    rng = random.Random(int(collar * 100) + skip_overlap)
    der = pyannote_metrics.DiarizationErrorRate(collar=collar, skip_overlap=skip_overlap)
    jer = pyannote_metrics.JaccardErrorRate(collar=collar, skip_overlap=skip_overlap)
    total = Score()
    worst = 0.0
    for _ in range(60):
        ref = _random_turns(rng, list("ABCD")[: rng.randint(1, 4)], rng.randint(1, 15))
        hyp = _random_turns(rng, [str(i) for i in range(rng.randint(1, 5))], rng.randint(0, 15))
        ours = score(ref, hyp, collar=collar, skip_overlap=skip_overlap)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyannote warns that it approximates the UEM, as we do
            r, h = _annotation(ref), _annotation(hyp)
            expected_der, expected_jer = der(r, h), jer(r, h)
        worst = max(worst, abs(ours.der - expected_der), abs(ours.jer - expected_jer))
        total = total.add(ours)
    assert worst < 1e-6
    assert abs(total.der - abs(der)) < 1e-6 and abs(total.jer - abs(jer)) < 1e-6


def test_rttm_round_trip_and_errors():
    turns = [Segment(0.5, 2.25, "alice"), Segment(2.0, 3.0, "bob")]
    assert parse_rttm(format_rttm("f1", turns)) == {"f1": turns}
    text = ";; comment\nSPKR-INFO f1 1 <NA> <NA> <NA> unknown alice <NA> <NA>\n" + format_rttm("f1", turns)
    assert parse_rttm(text) == {"f1": turns}
    for bad, message in [("SPEAKER f1 1 x 1 <NA> <NA> a <NA> <NA>", "must be numbers"),
                         ("SPEAKER f1 1 1.0 -2 <NA> <NA> a <NA> <NA>", ">= 0"),
                         ("SPEAKER f1 1 1.0", "at least 8 fields")]:
        with pytest.raises(RttmError, match=message):
            parse_rttm("SPEAKER f1 1 0 1 <NA> <NA> a <NA> <NA>\n" + bad, "x.rttm")


def test_der_command_prints_files_and_overall(tmp_path, capsys):
    ref = {"a": [Segment(0, 4, "A"), Segment(4, 8, "B")], "b": [Segment(0, 5, "A")]}
    hyp = {"a": [Segment(0, 5, "1"), Segment(5, 8, "2")], "b": [Segment(1, 5, "x")]}
    (tmp_path / "ref.rttm").write_text("".join(format_rttm(f, t) for f, t in ref.items()))
    (tmp_path / "hyp.rttm").write_text("".join(format_rttm(f, t) for f, t in hyp.items()))
    assert main(["der", str(tmp_path / "ref.rttm"), str(tmp_path / "hyp.rttm")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    a, b = score(ref["a"], hyp["a"]), score(ref["b"], hyp["b"])
    assert float(rows["a"][1]) == pytest.approx(100 * a.der, abs=0.01)
    assert float(rows["b"][1]) == pytest.approx(100 * b.der, abs=0.01)
    assert float(rows["OVERALL"][1]) == pytest.approx(100 * a.add(b).der, abs=0.01)
    assert float(rows["OVERALL"][2]) == pytest.approx(100 * a.add(b).jer, abs=0.01)


@pytest.mark.parametrize("content,expected", [(None, "no such file"),
                                              ("SPEAKER f 1 zero 1 <NA> <NA> A <NA> <NA>\n", "x.rttm:1")])
def test_der_command_bad_input_is_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "x.rttm"
    if content is not None:
        path.write_text(content)
    assert main(["der", str(path), str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0]
