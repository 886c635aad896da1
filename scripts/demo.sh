#!/usr/bin/env bash
# README command 1: set up, then replay the shipped three-turn conversation through the whole agent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# runs/demo is this script's own output: replace the previous demo's bundle (a bundle is never written into twice)
rm -rf runs/demo
exec .venv/bin/voice-agent replay sessions/demo --config demo --out runs/demo "$@"
