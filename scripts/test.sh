#!/usr/bin/env bash
# Runs the test suite from a bare machine: makes .venv if missing, installs the torch/torchvision pair that works
# here (see ENV notes in README), the package with its test extra, then pytest (CI selection: not slow, not gpu).
# Usage: scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m pytest -q "$@"
