#!/usr/bin/env bash
# Stage 3 recipe (PPO / PPO-ptx).
#   with a reward model:  PRETRAIN=outputs/sft RM_PATH=outputs/rm PROMPT_DATASET=prompts.jsonl bash examples/train_prompts.sh
#   with a Python reward: PRETRAIN=outputs/sft REWARD_FN=my_rewards.py:score PROMPT_DATASET=prompts.jsonl bash examples/train_prompts.sh
# Optional: NPROC=2 (DDP), PRETRAIN_DATASET=text.jsonl (PPO-ptx), LORA_RANK=16, TARGET_KL=6 (adaptive KL);
# extra flags are passed through ("$@"), e.g. --resume or --offload_ref_reward.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
STRATEGY=${STRATEGY:-$([ "$NPROC" -gt 1 ] && echo ddp || echo naive)}
ARGS=()
if [ -n "${REWARD_FN:-}" ]; then
    ARGS+=(--reward_fn "$REWARD_FN")
else
    ARGS+=(--rm_path "${RM_PATH:?set RM_PATH to a reward model dir (train_reward_model.py) or REWARD_FN to module:function}")
    ARGS+=(--rm_pretrain "${RM_PRETRAIN:-$PRETRAIN}")
fi
[ -n "${PRETRAIN_DATASET:-}" ] && ARGS+=(--pretrain_dataset "$PRETRAIN_DATASET" --ptx_coef "${PTX_COEF:-0.9}")
[ -n "${TARGET_KL:-}" ] && ARGS+=(--target_kl "$TARGET_KL")
torchrun --standalone --nproc_per_node="$NPROC" examples/train_prompts.py \
    --pretrain "${PRETRAIN:?set PRETRAIN to the SFT model dir}" \
    --model "${MODEL:-auto}" \
    --strategy "$STRATEGY" \
    --prompt_dataset "${PROMPT_DATASET:?set PROMPT_DATASET to a prompt file}" \
    --save_path "${SAVE_PATH:-outputs/ppo}" \
    --num_episodes "${NUM_EPISODES:-10}" \
    --num_collect_steps "${NUM_COLLECT_STEPS:-10}" \
    --num_update_steps "${NUM_UPDATE_STEPS:-5}" \
    --experience_batch_size "${EXPERIENCE_BATCH_SIZE:-8}" \
    --train_batch_size "${TRAIN_BATCH_SIZE:-8}" \
    --ptx_batch_size "${PTX_BATCH_SIZE:-1}" \
    --max_input_len "${MAX_INPUT_LEN:-96}" \
    --max_seq_len "${MAX_SEQ_LEN:-128}" \
    --kl_coef "${KL_COEF:-0.1}" \
    --lr "${LR:-1e-6}" \
    --critic_lr "${CRITIC_LR:-9e-6}" \
    --lora_rank "${LORA_RANK:-0}" \
    --save_interval "${SAVE_INTERVAL:-5}" \
    "${ARGS[@]}" \
    "$@"
