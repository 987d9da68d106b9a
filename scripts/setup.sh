#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages (when root and missing), the .venv, torch's CPU
# wheel first (so pip does not pull a CUDA build), triton, then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(espeak-ng sox mosquitto mosquitto-clients libportaudio2 libsndfile1 libasound2-plugins pulseaudio pulseaudio-utils tmux openssl)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages (${missing[*]}); install them with apt-get as root" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.streamwavlm-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q "triton==3.7.1"
.venv/bin/pip install -q -e ".[test,triton,bench,diarization]"
.venv/bin/pip install -q --no-deps "resemblyzer==0.1.4"  # its real needs are in the diarization extra
echo "$want" > "$stamp"
echo "setup: .venv ready"
