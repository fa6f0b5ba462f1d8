#!/usr/bin/env bash
# GloFND against no filter, side by side, on CPU: from a bare machine, install, build the digits bed (1,500 real
# handwritten digits with captions such as "the digit seven", 297 held out), train clip-tiny's image tower against a
# frozen pretrained MiniLM text tower twice with the same seed — once without a filter, once with GloFND — and print
# one table: zero-shot acc1 and retrieval R@1 on the held-out digits, the filter against the digit labels (precision,
# recall), the fraction of negatives filtered against alpha, the median threshold lambda.
# With a frozen text tower, "the digit seven" and "a handwritten 7" stay two different points, so the ~10% of
# negatives that are the same digit push each image away from captions that mean what its own caption means: those
# are the false negatives GloFND learns to drop. GloFND runs as the paper sets it up, at the α the evidence chose on
# this bed (benchmarks/README, "The α sweep ...", 12 epochs): α 0.02 (the most similar ~2% of negatives, about 0.6 per row in
# a batch of 32), λ starting at 1 (filters nothing until λ has come down to the similarities, about epoch 6 here),
# masks from epoch 2, 12 epochs.
#
# Usage: scripts/demo.sh [-h|--help] [EXTRA clip-glofnd train FLAGS ...]   (given to both runs, e.g. --seed 1)
# Environment: OUT  folder for the data and the runs, relative to where you run the script [demo]
#              ORACLE=1  also train with the label oracle (+50% time)
#              DRY_RUN=1  build the bed if missing, then only check the training commands (flags, model, paths;
#                         what tests/test_cli.py does)
# Writes OUT/digits_minilm/ (the bed, ~14 MB), OUT/logs/{none,glofnd}-<time>/ (metrics.jsonl, lambda_epoch_N.png)
# and OUT/logs/demo-<time>.json (the table).
# Measured: see README "Quick start" (the numbers and the command that produced them).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)    # the checkout; relative paths you pass stay relative to where you stand
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
OUT=${OUT:-demo}
BED=$OUT/digits_minilm
STAMP=$(date +%Y%m%d-%H%M%S)
COMMON=(train --train-data "$BED/train/{00000..00011}.tar" --model clip-tiny-minilm --lock-text --aug-cfg "scale=(1,1)"
        --batch-size 32 --epochs 12 --lr 1e-3 --wd 0.1 --warmup 47 --precision fp32 --workers 0 --seed 0
        --zeroshot-data "$BED/wds/digits_cls" --retrieval-data "$BED/wds/digits_ret" --eval-every 12
        --save-frequency 0 --logs "$OUT/logs")
FILTERS=(none glofnd)
[[ ${ORACLE:-0} == 1 ]] && FILTERS+=(oracle)
declare -A FLAGS=([none]="--fnd none"
                  [glofnd]="--fnd glofnd --fnd-alpha 0.02 --fnd-lr 0.1 --fnd-init one --fnd-mask-start-epoch 1"
                  [oracle]="--fnd oracle --fnd-mask-start-epoch 1")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    [[ -f $BED/digits.json ]] || python -m clip_glofnd.cli make-digits-minilm "$BED"
    for f in "${FILTERS[@]}"; do
        # shellcheck disable=SC2086
        python -m clip_glofnd.cli "${COMMON[@]}" ${FLAGS[$f]} --name "$f-$STAMP" "$@" --dry-run
    done
    exit 0
fi
began=$(date +%s)
source "$ROOT/scripts/setup_env.sh"
CORES=$(nproc)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1          # one thread per run: the runs go side by side on the cores
[[ -f $BED/digits.json ]] || clip-glofnd make-digits-minilm "$BED"
mkdir -p "$OUT/logs"
echo "== training clip-tiny (image tower) against frozen MiniLM: ${FILTERS[*]}, side by side ($CORES cores)"
pids=()
for f in "${FILTERS[@]}"; do
    # shellcheck disable=SC2086
    clip-glofnd "${COMMON[@]}" ${FLAGS[$f]} --name "$f-$STAMP" "$@" > "$OUT/logs/$f-$STAMP.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "run ${FILTERS[$i]} failed: see $OUT/logs/${FILTERS[$i]}-$STAMP.log" >&2; exit 1; }
done
runs=()
for f in "${FILTERS[@]}"; do runs+=("$OUT/logs/$f-$STAMP"); done
echo
clip-glofnd compare "${runs[@]}" --json "$OUT/logs/demo-$STAMP.json"
echo
echo "acc1 / R@1: held-out digits after the last epoch; filtered, FN precision / recall: epochs 2-12, against the"
echo "digit labels (same digit = a true false negative; chance precision ~10%)."
echo "lambda picture: $OUT/logs/glofnd-$STAMP/lambda_epoch_12.png"
echo "total wall time including setup: $(( $(date +%s) - began )) s"
