#!/usr/bin/env bash
# README command 2 (and CI): set up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# MLX's Linux CPU wheel has a reference BLAS; Debian's OpenBLAS preloaded makes the model tests ~30x faster.
lib=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname)" = Linux ] && [ -e "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; fi
.venv/bin/ruff check agent pipelines tests  # lint first: a finding fails the run (CI included) before any test
exec .venv/bin/python -m pytest -q --durations=12 "$@"
