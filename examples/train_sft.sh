#!/usr/bin/env bash
# Stage 1 recipe. Usage: PRETRAIN=path/to/hf_model DATASET=data.json [NPROC=2] bash examples/train_sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
STRATEGY=${STRATEGY:-$([ "$NPROC" -gt 1 ] && echo ddp || echo naive)}
torchrun --standalone --nproc_per_node="$NPROC" examples/train_sft.py \
    --pretrain "${PRETRAIN:?set PRETRAIN to a Hugging Face model dir}" \
    --model "${MODEL:-auto}" \
    --strategy "$STRATEGY" \
    --dataset "${DATASET:?set DATASET to an SFT data file}" \
    --save_path "${SAVE_PATH:-outputs/sft}" \
    --batch_size "${BATCH_SIZE:-4}" \
    --accumulation_steps "${ACCUMULATION_STEPS:-8}" \
    --lr "${LR:-2e-5}" \
    --max_epochs "${MAX_EPOCHS:-1}" \
    --max_len "${MAX_LEN:-512}" \
    --lora_rank "${LORA_RANK:-0}" \
    --eval_ratio 0.02 \
    --save_interval "${SAVE_INTERVAL:-500}" \
    "$@"
