"""RTTM files: the NIST exchange format of diarization references and hypotheses.

One ``SPEAKER`` line per turn: ``SPEAKER <file> <channel> <onset> <duration> <NA> <NA> <speaker> <NA> <NA>``.
Other line types (``SPKR-INFO``, ...) and ``;;`` comments are skipped; a ``SPEAKER`` line that cannot be
read is refused with its line number, because a silently dropped turn changes every score computed from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class RttmError(ValueError):
    """An RTTM file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Segment:
    """One speaker turn, in seconds."""

    start: float
    end: float
    speaker: str

    @property
    def duration(self) -> float:
        return self.end - self.start


def parse_rttm(text: str, source: str = "<rttm>") -> dict[str, list[Segment]]:
    """Turns per file id, in file order."""
    files: dict[str, list[Segment]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith(";;") or fields[0] != "SPEAKER":
            continue
        where = f"{source}:{number}"
        if len(fields) < 8:
            raise RttmError(f"{where}: a SPEAKER line needs at least 8 fields "
                            f"(SPEAKER file channel onset duration NA NA speaker), got {len(fields)}")
        try:
            onset, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise RttmError(f"{where}: onset {fields[3]!r} and duration {fields[4]!r} must be numbers") from None
        if not (math.isfinite(onset) and math.isfinite(duration)) or onset < 0 or duration < 0:
            raise RttmError(f"{where}: onset {onset} and duration {duration} must be finite and >= 0")
        files.setdefault(fields[1], []).append(Segment(onset, onset + duration, fields[7]))
    return files


def read_rttm(path: str | Path) -> dict[str, list[Segment]]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RttmError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RttmError(f"{p}: cannot read it as text: {e}") from None
    return parse_rttm(text, str(p))


def format_rttm(file_id: str, segments: Iterable[Segment]) -> str:
    """RTTM lines with millisecond times (the precision of the common scoring tools)."""
    return "".join(f"SPEAKER {file_id} 1 {s.start:.3f} {s.duration:.3f} <NA> <NA> {s.speaker} <NA> <NA>\n"
                   for s in segments)


def write_rttm(path: str | Path, file_id: str, segments: Iterable[Segment]) -> None:
    Path(path).write_text(format_rttm(file_id, segments), encoding="utf-8")
