#!/usr/bin/env bash
# CC3M pretraining, the GloFND paper's recipe (Balmaseda et al., ICML 2025, arXiv 2502.20612, CC3M setting):
# RN50 from scratch, global batch 1024, AdamW lr 1e-3, wd 0.1, 10k warmup steps, 37 epochs, gamma cosine from 1 to
# 0.2 over 18 epochs, 3,318,333 samples (id space), fp16 AMP.
#   LOSS=fastclip (default): FastCLIP-v3 (tau0 0.07, rho 6.5, lr_tau 2e-4) + GloFND alpha 1e-3 from epoch 20
#   LOSS=sogclr:             SogCLR / FastCLIP-v1 (tau 0.03)              + GloFND alpha 5e-4 from epoch 15
#   lambda starts at 1 as in the paper (--fnd-init one, also the trainer's default; pinned here)
#
# Usage: scripts/train_cc3m.sh [-h|--help] [EXTRA clip-glofnd train FLAGS ...]
#   torchrun on one node:  GPUS=8 scripts/train_cc3m.sh
#   SLURM, any nodes:      sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8 \
#                              --wrap "LAUNCH=srun scripts/train_cc3m.sh"
# Environment (defaults in brackets):
#   DATA    shard pattern [/data/cc3m/{00000..00331}.tar], with sizes.json beside the shards
#   LOSS    fastclip | sogclr [fastclip]
#   LAUNCH  torchrun | srun [torchrun]; srun runs one task per GPU inside the allocation
#   GPUS    processes on this node with torchrun [8]; with srun the world size is SLURM_NTASKS
#   WORKERS data loader workers per GPU [6]   LOGS [./logs]   NAME [cc3m-rn50-$LOSS-glofnd]
#   DRY_RUN=1  check the command here instead of launching it: flags, model name, and that the shards and other
#              paths exist (what tests/test_cli.py does)
# Relative paths resolve against the folder you run the script from (LOGS=./logs too), not the checkout.
# The per-GPU batch is 1024 / world size; the run resumes itself (--resume latest) when started again, from its last
# checkpoint: every epoch end and every 1,000 steps inside an epoch (--save-every-n-steps), so a preemption costs at
# most 1,000 steps (restart with the same GPU count; with another, add --resume LOGS/NAME/checkpoints/epoch_N.pt).
# Measured: not run on this project's machines (no multi-GPU node); `DRY_RUN=1` validates the flags here.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)    # the checkout; relative paths you pass stay relative to where you stand
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
DEFAULT_DATA='/data/cc3m/{00000..00331}.tar'
DATA=${DATA:-$DEFAULT_DATA}
LOSS=${LOSS:-fastclip}
LAUNCH=${LAUNCH:-torchrun}
GPUS=${GPUS:-8}
WORKERS=${WORKERS:-6}
LOGS=${LOGS:-./logs}
NAME=${NAME:-cc3m-rn50-$LOSS-glofnd}
if [[ $LAUNCH == srun ]]; then WORLD=${SLURM_NTASKS:?LAUNCH=srun needs a SLURM allocation}; else WORLD=$GPUS; fi
if (( 1024 % WORLD )); then echo "$(basename "$0"): world size $WORLD does not divide the batch 1024" >&2; exit 2; fi
case $LOSS in
    fastclip) LOSS_FLAGS=(--loss fastclip --loss-tau 0.07 --loss-rho 6.5 --lr-tau 2e-4
                          --fnd glofnd --fnd-alpha 1e-3 --fnd-start-epoch 20) ;;
    sogclr)   LOSS_FLAGS=(--loss sogclr --loss-tau 0.03 --fnd glofnd --fnd-alpha 5e-4 --fnd-start-epoch 15) ;;
    *) echo "$(basename "$0"): LOSS must be fastclip or sogclr, got '$LOSS'" >&2; exit 2 ;;
esac
ARGS=(train --train-data "$DATA" --num-samples 3318333 --model RN50 --batch-size $((1024 / WORLD))
      --epochs 37 --lr 1e-3 --wd 0.1 --warmup 10000 --precision amp
      --loss-gamma-min 0.2 --loss-gamma-decay-epochs 18 "${LOSS_FLAGS[@]}" --fnd-init one
      --workers "$WORKERS" --logs "$LOGS" --name "$NAME" --resume latest --save-frequency 1
      --save-every-n-steps 1000 "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    exec python -m clip_glofnd.cli "${ARGS[@]}" --dry-run
elif [[ $LAUNCH == srun ]]; then
    exec srun --kill-on-bad-exit=1 python -m clip_glofnd.cli "${ARGS[@]}"
else
    exec torchrun --standalone --nproc_per_node="$GPUS" -m -- clip_glofnd.cli "${ARGS[@]}"
fi
