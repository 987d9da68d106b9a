"""``streamwavlm der REF.rttm HYP.rttm``: DER and JER per file and overall (pyannote.metrics' semantics)."""

from __future__ import annotations

import argparse
import json
import sys

from ..diarization.der import Score, score
from ..diarization.rttm import read_rttm


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("der", help="diarization and Jaccard error rates of a hypothesis RTTM against a reference")
    p.add_argument("reference", help="reference RTTM")
    p.add_argument("hypothesis", help="hypothesis RTTM")
    p.add_argument("--collar", type=float, default=0.0,
                   help="seconds around each reference boundary not scored, half on each side (default: 0)")
    p.add_argument("--skip-overlap", action="store_true", help="do not score overlapping reference speech")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=der)


def der(args: argparse.Namespace) -> int:
    if args.collar < 0:
        raise ValueError(f"--collar must be >= 0 seconds, got {args.collar}")
    ref, hyp = read_rttm(args.reference), read_rttm(args.hypothesis)
    for file_id in sorted(set(hyp) - set(ref)):
        print(f"streamwavlm der: warning: {file_id!r} is in the hypothesis only; not scored", file=sys.stderr)
    rows: dict[str, Score] = {f: score(ref[f], hyp.get(f, []), collar=args.collar, skip_overlap=args.skip_overlap)
                              for f in ref}
    total = Score()
    for s in rows.values():
        total = total.add(s)
    if args.json:
        print(json.dumps({name: {"der": s.der, "jer": s.jer, "missed": s.missed, "false_alarm": s.false_alarm,
                                 "confusion": s.confusion, "total": s.total}
                          for name, s in {**rows, "OVERALL": total}.items()}, indent=1))
        return 0
    print(f"{'file':<24} {'DER %':>7} {'JER %':>7} {'miss %':>7} {'FA %':>7} {'conf %':>7} {'speech s':>9}")
    for name, s in {**rows, "OVERALL": total}.items():
        t = s.total or 1.0
        print(f"{name:<24} {100 * s.der:7.2f} {100 * s.jer:7.2f} {100 * s.missed / t:7.2f} "
              f"{100 * s.false_alarm / t:7.2f} {100 * s.confusion / t:7.2f} {s.total:9.2f}")
    return 0
