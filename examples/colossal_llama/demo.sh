#!/usr/bin/env bash
# Colossal-LLaMA's recipe end to end on CPU with a tiny LLaMA and the LLaMA-2 tokenizer (a few minutes on 2
# cores): pieces from Chinese text -> extended tokenizer -> mean-initialised model -> spliced, binned zh + en
# data -> continual pre-training -> NEFTune SFT -> first-token MC evaluation -> one chat answer.
#   bash examples/colossal_llama/demo.sh [OUT]        (data from ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/colossal_llama_demo}
DATA=${DATA:-../shared/data}
PY=${PYTHON:-python}
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
R=examples/colossal_llama
mkdir -p "$OUT/raw/pretrain" "$OUT/raw/sft" "$OUT/mc"

# a tiny random LLaMA with the LLaMA-2 tokenizer, and small slices of the demo data (category = file name)
$PY - "$DATA" "$OUT" <<'PYEOF'
import json, random, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaTokenizer
data, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = LlamaTokenizer.from_pretrained(str(data / "tokenizers" / "llama2"))
cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
AutoModelForCausalLM.from_config(cfg).save_pretrained(out / "tiny_llama")
tok.save_pretrained(out / "tiny_llama")
zh = json.loads((data / "sft" / "alpaca_zh_demo.json").read_text())
def dump(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
dump(out / "raw/pretrain/zh.jsonl", [{"source": "", "target": r["instruction"] + "\n" + r["output"]} for r in zh[:150]])
c4 = [json.loads(l)["text"] for l in (data / "pretrain" / "c4_demo.jsonl").read_text().splitlines()]
wiki = [l for l in (data / "pretrain" / "wiki_demo.txt").read_text().splitlines() if l.strip()]
dump(out / "raw/pretrain/en.jsonl", [{"source": "", "target": t[:1000]} for t in c4[:30] + wiki[:10]])
dump(out / "raw/sft/chat.jsonl", [{"messages": [{"from": "human", "content": r["instruction"]},
                                                 {"from": "assistant", "content": r["output"][:300]}]} for r in zh[150:250]])
rng = random.Random(0)
mc = [{"subject": "arithmetic", "question": f"{a} + {b} = ?", "A": str(a + b), "B": str(a + b + 1),
       "C": str(a + b + 2), "D": str(a + b - 1)} for a, b in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(24))]
for i, row in enumerate(mc):  # shuffle which letter is right
    k = "ABCD"[i % 4]; row["A"], row[k] = row[k], row["A"]; row["answer"] = k
dump(out / "mc/dev.jsonl", mc[:4]); dump(out / "mc/test.jsonl", mc[4:])
PYEOF

$PY $R/make_expand_tokens.py --source_tokenizer_dir "$DATA/tokenizers/llama2" \
    --corpus "$DATA/sft/alpaca_zh_demo.json" --vocab_size 8000 --expand_tokens_file "$OUT/pieces.jsonl"
$PY $R/init_tokenizer.py --source_tokenizer_dir "$DATA/tokenizers/llama2" \
    --target_tokenizer_dir "$OUT/tokenizer" --expand_tokens_file "$OUT/pieces.jsonl"
$PY $R/init_model.py --source_model_and_tokenizer_path "$OUT/tiny_llama" \
    --target_tokenizer_path "$OUT/tokenizer" --target_model_path "$OUT/extended"
$PY $R/prepare_pretrain_dataset.py --data_input_dirs "$OUT/raw/pretrain" --tokenizer_dir "$OUT/extended" \
    --data_output_dirs "$OUT/pretrain_data" --max_length 256 --num_spliced_dataset_bins 4
$PY $R/prepare_sft_dataset.py --data_input_dirs "$OUT/raw/sft" --tokenizer_dir "$OUT/extended" \
    --data_output_dirs "$OUT/sft_data" --max_length 256 --num_spliced_dataset_bins 2 --llama_version 2
# continual pre-training (knowledge injection with English replay), then NEFTune SFT as the next stage
$PY $R/train.py --pretrained "$OUT/extended" --dataset "$OUT/pretrain_data" --plugin naive \
    --mixed_precision no --num_epochs 1 --micro_batch_size 4 --accumulation_steps 1 --lr 2e-3 \
    --warmup_steps 5 --max_length 256 --save_interval 20 --save_dir "$OUT/stage1"
$PY $R/train.py --pretrained "$OUT/extended" --load_checkpoint "$OUT/stage1" --dataset "$OUT/sft_data" \
    --plugin naive --mixed_precision no --num_epochs 1 --micro_batch_size 4 --accumulation_steps 1 --lr 1e-3 \
    --max_length 256 --save_interval 0 --save_dir "$OUT/sft" --use_neft --neftune_noise_alpha 5
$PY $R/eval_mc.py --model_path "$OUT/sft" --data "$OUT/mc/test.jsonl" --dev_data "$OUT/mc/dev.jsonl" \
    --k_shot 2 --output "$OUT/mc_report.json"
$PY inference/chat.py --model_path "$OUT/sft" --device cpu --input_txt "介绍一下细胞理论。" --max_new_tokens 20 \
    --do_sample false --prompt_template alpaca
