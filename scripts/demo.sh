#!/usr/bin/env bash
# README command 1: set up, then replay the shipped three-turn conversation through the whole agent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/voice-agent replay sessions/demo --config demo --out runs/demo "$@"
