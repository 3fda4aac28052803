#!/usr/bin/env bash
# Stage 2 recipe. Usage: PRETRAIN=outputs/sft DATASET=pairs.json [NPROC=2] bash examples/train_rm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
STRATEGY=${STRATEGY:-$([ "$NPROC" -gt 1 ] && echo ddp || echo naive)}
torchrun --standalone --nproc_per_node="$NPROC" examples/train_reward_model.py \
    --pretrain "${PRETRAIN:?set PRETRAIN to the SFT model dir}" \
    --model "${MODEL:-auto}" \
    --strategy "$STRATEGY" \
    --dataset "${DATASET:?set DATASET to a preference data file}" \
    --save_path "${SAVE_PATH:-outputs/rm}" \
    --loss_fn "${LOSS_FN:-log_sig}" \
    --batch_size "${BATCH_SIZE:-4}" \
    --lr "${LR:-5e-6}" \
    --max_epochs "${MAX_EPOCHS:-1}" \
    --max_len "${MAX_LEN:-512}" \
    --lora_rank "${LORA_RANK:-0}" \
    "$@"
