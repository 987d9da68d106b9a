#!/usr/bin/env bash
# Regenerate the bundled speech sample: two espeak-ng voices, one after the other, 16 kHz mono 16-bit.
set -euo pipefail
out=${1:-streamwavlm/data/sample.wav}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
espeak-ng -v en+f3 -p 70 -s 160 --stdout \
  "Streaming speech embeddings arrive chunk by chunk. The quick brown fox jumps over the lazy dog." \
  | sox -t wav - -r 16000 -c 1 -b 16 "$tmp/a.wav"
espeak-ng -v en+m3 -p 35 -s 150 --stdout \
  "A second voice says something different, so that speakers can be told apart." \
  | sox -t wav - -r 16000 -c 1 -b 16 "$tmp/b.wav"
sox "$tmp/a.wav" "$tmp/b.wav" "$out"
