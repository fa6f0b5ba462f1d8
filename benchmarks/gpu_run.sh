#!/usr/bin/env bash
# The one GPU run of issue #17 (python -m benchmarks.gpu), with the packages the GPU machine lacks brought as wheels.
#
# Usage:
#   bash benchmarks/gpu_run.sh prepare                 # here, with network: wheels into .whl/ (gitignored, ~2.4 MB)
#   bash benchmarks/gpu_run.sh run "$OUT" [ARGS...]    # on the GPU machine (no network): install .whl/*.whl into a
#                                                      # temporary folder, then python -m benchmarks.gpu --out "$OUT"
# The GPU machine has torch, torchvision, timm, pandas but not open_clip_torch, webdataset, braceexpand, ftfy
# (/work/shared/ENV.md); .whl/ must travel with the checkout (the device runner's `carry: [".whl"]`).
# ARGS go to benchmarks.gpu, e.g. --budget-s 420 or --parts ab.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=(open_clip_torch==3.3.0 webdataset==0.2.86 braceexpand ftfy wcwidth)

case "${1:-}" in
  prepare)
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}"
    ls -l .whl
    ;;
  run)
    out="${2:?usage: bash benchmarks/gpu_run.sh run OUT_DIR [ARGS...]}"
    shift 2
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "gpu_run.sh: no wheels in .whl/; run 'bash benchmarks/gpu_run.sh prepare' first" >&2
      exit 2
    fi
    target="$(mktemp -d)"
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$target" .whl/*.whl
    PYTHONPATH="$PWD:$target${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m benchmarks.gpu --out "$out" "$@"
    ;;
  *)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
