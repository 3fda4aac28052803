#!/usr/bin/env bash
# The GPU checks of issue 13 in one device call: the CUDA-only tests (liger-kernel's fused loss against full
# logits, packed samples isolated under sdpa and FlexAttention, fp16 resume), then a 1B LLaMA (TinyLlama's
# shape, random weights) SFT in bf16 with packing, three arms, each reporting MFU (benchmarks/bench_sft.py).
#
#   benchmarks/gpu_check.sh prepare   on the CPU machine: the data and the liger-kernel wheel into .gpu/
#                                     (git-ignored through .git/info/exclude; about 2 MiB)
#   then the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=600)
#   (the steps' own limits add up to 570 s: tests 120, each bench arm 150, FlexAttention's compiling arm last)
#   benchmarks/gpu_check.sh flash    the flash attention step (issue 23), a device call of its own: see below
#
# What it writes under $OUT comes back: copy the JSON files to benchmarks/results/ and commit them. The
# device machine has torch, transformers and pytest but no liger-kernel, TRL or datasets, so TRL is not run.
# GPU_CHECK_ARGS / GPU_CHECK_ARMS replace the bench flags and the arms, PYTHON the interpreter (a rehearsal
# on CPU: GPU_CHECK_ARGS="--config tiny --device cpu --packing --steps 2 --skip_trl --skip_plain").
#
#   benchmarks/gpu_check.sh optim     the memory-light optimizers (issue 23), its own device call of about
#                                     480 s (run(command="bash benchmarks/gpu_check.sh optim", carry=[".gpu"])):
#   a. full fine-tuning of the 1B preset with each --optim: parameters + peak gradients + optimizer state
#      and peak GPU memory per optimizer (memory_optim_gpu_1b.json), from which the largest LLaMA-shaped
#      model each fits is bytes-per-parameter arithmetic;
#   b. LLaMA-7B's shape (hidden 4096, 32 layers, 6.7B parameters, fp32 masters) with AdamW, LOMO and
#      AdaLomo: AdamW's 4 x 27 GB cannot fit an 80 GB GPU, LOMO's and AdaLomo's ~1.05 x can
#      (memory_optim_gpu_7b.json);
#   c. one 1B GRPO step (actor trained, fp32 reference and reward model) under a 24 GiB cap, AdamW against
#      AdaLomo: AdamW's ~26 GB of weights, gradients and moments run out of memory, AdaLomo's step fits
#      (grpo_adalomo_gpu_1b.json).
#   OPTIM_CHECK_STEPS="a c" runs a subset.
#
#   benchmarks/gpu_check.sh vllm      the rollout engines (issue: vLLM), its own device call of about 8 min
#                                     (run(command="bash benchmarks/gpu_check.sh vllm", carry=[".gpu"], timeout_s=540)):
#   a GRPO and a PPO step of a 0.66B LLaMA (the 1b preset's shape, 12 layers; bf16 autocast, fp32 masters) with
#   each rollout engine, side by side (bench_ppo.py --rollout_engine hf vllm), 64 rows of 256 new tokens;
#   engines_{grpo,ppo}_gpu_1b.json. Goals, printed (never asserted): with vLLM a step takes at most 1.5x its
#   generation (step_over_generate <= 1.5) and vLLM generates at least 3x as fast as HF generate
#   (ratio_vllm_over_hf.gen_phase_tokens_per_s >= 3). vLLM (CUDA build) must be installed on the device
#   machine: its wheels are far over what a call carries; without it the step says so and stops.
#
#   benchmarks/gpu_check.sh generate  the HF rollout engine's sampling paths (benchmarks/bench_generate.py), its
#                                     own device call of about 6 min (run(command="bash benchmarks/gpu_check.sh
#                                     generate", carry=[".gpu"], timeout_s=420)): the 1B preset in bf16, 64 rows
#   (16 prompts x 4) of up to 128 tokens, transformers' own loop against dropping finished rows (the engine's
#   loop), the static cache, static cache + torch.compile, and continuous batching (generate_gpu_1b*.json), where
#   the last two are expected to matter; samples_equal says whether each keeps the same tokens on CUDA.
#   GENERATE_CHECK_ARGS replaces the bench flags (a rehearsal on CPU: GENERATE_CHECK_ARGS="--config tiny
#   --batch_size 8 --max_new_tokens 16 --repeats 1").
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-run}" = prepare ]; then
  set -e
  shared=${COATI_SHARED_DATA:-../shared/data}
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu/data/sft .gpu/data/tokenizers .gpu/whl
  cp "$shared/sft/alpaca_en_demo.json" .gpu/data/sft/
  cp -r "$shared/tokenizers/llama2" .gpu/data/tokenizers/
  mkdir -p .gpu/data/prompts && cp "$shared/prompts/vicuna_question_80.jsonl" .gpu/data/prompts/  # bench_ppo, _generate
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/whl liger-kernel==0.8.5
  # the optimizers' packages (the `optim` checks): lomo-optim and bitsandbytes (about 42 MiB)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d .gpu/whl_optim lomo-optim==0.1.1 bitsandbytes==0.50.2
  du -sh .gpu
  exit 0
fi

out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export COATI_SHARED_DATA=$PWD/.gpu/data PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ "${1:-run}" = optim ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/optim_pkgs .gpu/whl_optim/*.whl
  export PYTHONPATH=$PWD:/tmp/optim_pkgs
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/optim_gpu.txt"
  bench="$py benchmarks/bench_memory.py --device cuda --precision bf16 --threads 16"
  for step in ${OPTIM_CHECK_STEPS:-a b c}; do
    echo "== optim step $step"
    case $step in
      a) timeout 170 $bench --config 1b --strategies naive --optim adamw_torch,adamw_bnb_8bit,adafactor,lomo,adalomo \
           --batch_size 4 --seq_len 512 --warmup_steps 1 --steps 2 --output "$out/memory_optim_gpu_1b.json" ;;
      b) timeout 200 $bench --config 1b --hidden 4096 --layers 32 --grad_checkpoint --strategies naive \
           --optim adamw_torch,lomo,adalomo --batch_size 1 --seq_len 512 --warmup_steps 1 --steps 1 \
           --output "$out/memory_optim_gpu_7b.json" ;;
      c) timeout 150 $bench --config 1b --ppo grpo --optim adamw_torch,adalomo --gpu_mem_cap_gb 24 \
           --batch_size 4 --seq_len 256 --warmup_steps 0 --steps 1 --output "$out/grpo_adalomo_gpu_1b.json" ;;
    esac > "$out/optim_$step.log" 2>&1
    tail -c 1500 "$out/optim_$step.log"; echo
  done
  ls -la "$out"
  exit 0
fi
if [ "${1:-run}" = vllm ]; then
  export PYTHONPATH=$PWD
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $py -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)" 2>&1 | tail -n 1
  } | tee "$out/engines_gpu.txt"
  if ! $py -c "import vllm" >/dev/null 2>&1; then
    echo "vllm step skipped: no vLLM on this machine (pip install 'coati[vllm]' there first)"
    exit 0
  fi
  for algo in grpo ppo; do
    name=engines_${algo}_gpu_1b
    echo "== $name"
    # PPO also trains a critic of the actor's size: vLLM gets less of the GPU there
    util=$([ $algo = ppo ] && echo 0.25 || echo 0.4)
    timeout 250 $py benchmarks/bench_ppo.py --algo $algo --rollout_engine hf vllm --config 1b --layers 12 \
      --device cuda --precision bf16 --threads 16 --batch_size 64 --num_generations 8 --seq_len 128 --gen_len 256 \
      --warmup_steps 1 --steps 2 --vllm_gpu_memory_utilization $util --output "$out/$name.json" \
      2> "$out/$name.log" | $py -c "
import json, sys
r = json.loads(sys.stdin.read())
for engine, e in r['engines'].items():
    print(engine, {k: e.get(k) for k in ('step_s', 'time_split_s', 'step_over_generate', 'gen_phase_tokens_per_s',
                                        'peak_gpu_mem_mb', 'error')})
v, ratio = r['engines'].get('vllm', {}), r.get('ratio_vllm_over_hf', {}).get('gen_phase_tokens_per_s')
print('goal step <= 1.5 x generate (vllm):', v.get('step_over_generate'), 'met' if (v.get('step_over_generate')
      or 9) <= 1.5 else 'NOT met')
print('goal vllm >= 3 x HF generate:', ratio, 'met' if (ratio or 0) >= 3 else 'NOT met')"
    tail -n 3 "$out/$name.log"
  done
  ls -la "$out"
  exit 0
fi
if [ "${1:-run}" = generate ]; then
  export PYTHONPATH=$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/generate_gpu.txt"
  bench="$py benchmarks/bench_generate.py ${GENERATE_CHECK_ARGS:---config 1b --device cuda --precision bf16 \
--batch_size 64 --num_generations 4 --max_new_tokens 128 --eos_prob 0.02 --repeats 3}"
  # continuous batching in a run of its own, so that a hang there cannot cost the others
  timeout 240 $bench --paths generate,drop_finished,static,static_compile --output "$out/generate_gpu_1b.json" \
    2> "$out/generate_gpu_1b.log" | tail -c 2500; echo
  timeout 150 $bench --paths generate,continuous_batching --output "$out/generate_gpu_1b_cb.json" \
    2> "$out/generate_gpu_1b_cb.log" | tail -c 1500; echo
  tail -n 3 "$out"/generate_gpu_1b*.log
  exit 0
fi
args=${GPU_CHECK_ARGS:---config 1b --device cuda --precision bf16 --packing --seq_len 2048 --batch_size 128 \
--warmup_steps 3 --steps 10 --skip_trl --skip_plain}

if [ "${1:-run}" = flash ]; then
  # The attention kernels of issue 23, a device call of its own (about 6 min at most):
  #   run(command="bash benchmarks/gpu_check.sh flash", carry=[".gpu"], timeout_s=420)
  # their CUDA tests (flash_attention_2 / _3 and flex_attention against sdpa, padded logits and packed loss; a
  # kernel whose package is missing is skipped, naming it), then the 1B SFT on flash_attention_2 (packed rows
  # of --seq_len, varlen). flash-attn is not on PyPI as a wheel: put one built for the machine's torch in
  # .gpu/whl/flash/ (it is installed first), or the bench arm is skipped with a line saying so.
  flashpath=$PWD
  if ls .gpu/whl/flash/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/flash .gpu/whl/flash/*.whl
    flashpath=$PWD:/tmp/flash
  fi
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    PYTHONPATH=$flashpath $py -c "import importlib.util as u, torch; print('torch', torch.__version__, {m: \
u.find_spec(m) is not None for m in ('flash_attn', 'flash_attn_interface', 'kernels')})"
    PYTHONPATH=$flashpath timeout 180 $py -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_attention.py 2>&1 \
      | tail -n 20; } | tee "$out/gpu_attention.log"
  if PYTHONPATH=$flashpath $py -c "import importlib.util as u, sys; sys.exit(u.find_spec('flash_attn') is None)"; then
    echo "== sft_gpu_1b_flash_none"
    PYTHONPATH=$flashpath timeout 200 $py benchmarks/bench_sft.py $args --attn_implementation flash_attention_2 \
      --output "$out/sft_gpu_1b_flash_none.json" 2> "$out/sft_gpu_1b_flash_none.log" | tail -c 600
    tail -n 3 "$out/sft_gpu_1b_flash_none.log"
  else
    echo "sft_gpu_1b_flash_none skipped: no flash_attn on this machine (see .gpu/whl/flash/)"
  fi
  exit 0
fi

$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .gpu/whl/*.whl
# 1. the CUDA-only tests, liger-kernel on the path
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  PYTHONPATH=$PWD:/tmp/liger timeout 120 $py -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_lm_head.py tests/test_packing.py tests/test_resume.py 2>&1 | tail -n 40; } | tee "$out/gpu_tests.log"

# 2. the 1B SFT: sdpa (samples share no prompt, so packed rows are laid out dense: as long as the longest
#    sample, a block-diagonal mask) without liger, sdpa with it, FlexAttention (rows of --max_len) with it
arms=${GPU_CHECK_ARMS:-sdpa:none sdpa:liger flex_attention:liger}
for arm in $arms; do
  attn=${arm%%:*} kernels=${arm##*:}
  path=$PWD
  [ "$kernels" = liger ] && path=$PWD:/tmp/liger
  name=sft_gpu_1b_${attn%%_*}_${kernels}
  echo "== $name"
  PYTHONPATH=$path timeout 150 $py benchmarks/bench_sft.py $args --attn_implementation "$attn" \
    --output "$out/$name.json" 2> "$out/$name.log" | $py -c "
import json, sys
r = json.loads(sys.stdin.read())['coati'] or {}
print({k: r.get(k) for k in ('tokens_per_s', 'model_tflops_per_s', 'mfu', 'peak_gpu_mem_mb', 'error')})"
  tail -n 3 "$out/$name.log"
done
ls -la "$out"
