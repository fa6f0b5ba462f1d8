#!/usr/bin/env bash
# Fine-tune an OpenCLIP checkpoint (a local file: OpenCLIP's own or one of ours) on image-text shards with GloFND.
# A starting point, not a tuned recipe: CLIP loss with the checkpoint's learned temperature, AdamW lr 1e-5, wd 0.1,
# 500 warmup steps, 10 epochs; GloFND alpha 1e-3, lambda step 0.1, warm-started at each sample's mini-batch quantile.
# Before epoch 1, --state-warmup-epochs 2 runs two forward-only passes of the frozen pretrained model (eval mode, no
# optimizer step) that fill lambda of both modalities (and u with --loss sogclr/fastclip): a pretrained model's
# similarities already mean something, and starting lambda at 1 and u cold wastes or harms the first epochs (TuneCLIP,
# arXiv 2601.09859, recovers this state the same way before fine-tuning with global losses), so filtering starts at
# epoch 0 with thresholds that fit the model. Each pass costs about a third of a training epoch.
#
# Usage: PRETRAINED=/path/open_clip_model.pt MODEL=ViT-B-32 DATA='/data/mine/{00000..00099}.tar' \
#            scripts/finetune_openclip.sh [-h|--help] [EXTRA clip-glofnd train FLAGS ...]
#   e.g. add --lock-image (LiT: train the text tower only), --zeroshot-data DIR, --loss fastclip
# Environment (defaults in brackets):
#   PRETRAINED  OpenCLIP checkpoint file (required)     MODEL  its open_clip architecture [ViT-B-32]
#   DATA        shard pattern with sizes.json beside the shards (required)
#   LAUNCH      single | torchrun | srun [single]: one process (CPU or one GPU), torchrun on this node, or srun
#   GPUS        torchrun processes [1]    BATCH  per-process batch [128]    EPOCHS [10]    LR [1e-5]
#   STATE_WARMUP  forward-only passes that fill lambda / u before epoch 1 [2] (0: none, filtering from epoch 2)
#   WORKERS     loader workers [4]        LOGS [./logs]                     NAME [finetune-$MODEL-glofnd]
#   DRY_RUN=1   check the command here instead of running it: flags, model name, and that PRETRAINED, DATA and
#               the other paths exist (what tests/test_cli.py does)
# Relative paths resolve against the folder you run the script from (LOGS=./logs too), not the checkout.
# Measured: not run on this project's machines (no OpenCLIP weights offline); `DRY_RUN=1` validates the flags.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)    # the checkout; relative paths you pass stay relative to where you stand
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
if [[ -z ${PRETRAINED:-} || -z ${DATA:-} ]]; then
    echo "$(basename "$0"): set PRETRAINED (an OpenCLIP checkpoint file) and DATA (a shard pattern); see --help" >&2
    exit 2
fi
MODEL=${MODEL:-ViT-B-32}
LAUNCH=${LAUNCH:-single}
GPUS=${GPUS:-1}
BATCH=${BATCH:-128}
EPOCHS=${EPOCHS:-10}
LR=${LR:-1e-5}
WORKERS=${WORKERS:-4}
LOGS=${LOGS:-./logs}
NAME=${NAME:-finetune-$MODEL-glofnd}
STATE_WARMUP=${STATE_WARMUP:-2}
MASK_START=$(( STATE_WARMUP > 0 ? 0 : 2 ))
ARGS=(train --train-data "$DATA" --model "$MODEL" --pretrained "$PRETRAINED" --batch-size "$BATCH"
      --epochs "$EPOCHS" --lr "$LR" --wd 0.1 --warmup 500 --loss clip
      --fnd glofnd --fnd-alpha 1e-3 --fnd-lr 0.1 --fnd-init quantile --fnd-start-epoch 0
      --fnd-mask-start-epoch "$MASK_START" --state-warmup-epochs "$STATE_WARMUP"
      --workers "$WORKERS" --logs "$LOGS" --name "$NAME" --resume latest "$@")
case $LAUNCH in
    single)   RUN=(python -m clip_glofnd.cli) ;;
    torchrun) RUN=(torchrun --standalone --nproc_per_node="$GPUS" -m -- clip_glofnd.cli) ;;
    srun)     RUN=(srun --kill-on-bad-exit=1 python -m clip_glofnd.cli) ;;
    *) echo "$(basename "$0"): LAUNCH must be single, torchrun or srun, got '$LAUNCH'" >&2; exit 2 ;;
esac
if [[ ${DRY_RUN:-0} == 1 ]]; then
    exec python -m clip_glofnd.cli "${ARGS[@]}" --dry-run
fi
exec "${RUN[@]}" "${ARGS[@]}"
