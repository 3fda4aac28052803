"""Model families (coati/models/families.py): each family transformers ships trains from a tiny checkpoint shaped
like its published ones (bf16 in config and weights, grouped-query attention, tied embeddings where those tie,
sliding windows and soft-capping where they have them, pad == EOS, a chat template) through the example scripts:
SFT lowers the loss on a small repeated set, one DPO step and one GRPO step run. The families table's LoRA
targets name real modules and its tensor-parallel column is transformers' own; remote-code families (no
transformers class, so no offline model) are refused without --trust_remote_code."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import (
    CONFIG_MAPPING, AutoConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig, MistralConfig, Phi3Config, Qwen2Config,
    Qwen3Config,
)

from coati.errors import UsageError
from coati.models import Actor, LoraSettings
from coati.models.families import FAMILIES, check_remote_code, get_family
from tests import tiny
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 8  # short enough to cut attention in these samples
_BASE = dict(vocab_size=tiny.LLAMA_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16")
_GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW)
# family -> its config as published checkpoints set it, scaled down
PUBLISHED = {
    # Qwen2.5-0.5B / 1.5B tie their embeddings; the window covers the layers past max_window_layers
    "qwen2": lambda: Qwen2Config(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                                 max_window_layers=1, **_BASE),
    "qwen3": lambda: Qwen3Config(tie_word_embeddings=True, head_dim=8, **_BASE),  # Qwen3-0.6B..4B: tied
    "mistral": lambda: MistralConfig(sliding_window=WINDOW, tie_word_embeddings=False, **_BASE),  # v0.1's window
    "gemma": lambda: GemmaConfig(**{**_BASE, "num_key_value_heads": 1}, head_dim=8),  # gemma-2b: one KV head, tied
    "gemma2": lambda: Gemma2Config(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **_GEMMA, **_BASE),
    "gemma3": lambda: Gemma3TextConfig(layer_types=["sliding_attention", "full_attention"], **_GEMMA, **_BASE),
    "phi3": lambda: Phi3Config(tie_word_embeddings=False, **_BASE),
}
REMOTE = ["internlm2", "chatglm"]


def test_every_family_is_covered_here():
    native = {n for n, f in FAMILIES.items() if f.model_types and not f.remote_code}
    assert set(PUBLISHED) <= native and {n for n, f in FAMILIES.items() if f.remote_code} == set(REMOTE)
    assert native - set(PUBLISHED) == {"llama", "gpt_neox", "polyglot_ko", "gpt2", "opt", "bloom", "t5"}  # other tests'


@pytest.mark.parametrize("name", sorted(n for n in FAMILIES if n != "auto"))
def test_the_table_agrees_with_transformers(name):
    """Native families are transformers model types with a causal-LM class; ``tp_plan`` is whether their config
    class ships ``base_model_tp_plan``; packing families are among the architectures packing is checked on."""
    fam = FAMILIES[name]
    assert set(fam.packing_model_types) <= set(FAMILIES["auto"].packing_model_types)
    for model_type in fam.model_types:
        if fam.remote_code:
            assert model_type not in CONFIG_MAPPING and not fam.packing_model_types and not fam.tp_plan
            continue
        config_class = type(AutoConfig.for_model(model_type))
        assert fam.tp_plan == bool(getattr(config_class, "base_model_tp_plan", None))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_lora_targets_name_every_projection_of_each_layer(name):
    """Every target suffix matches a module in each decoder layer, and LoRA reaches every linear layer there
    (peft would accept a list that misses some of them)."""
    config = PUBLISHED[name]()
    fam = get_family(name)
    assert config.model_type in fam.model_types and fam.packing_model_types == (config.model_type,)
    actor = Actor.from_config(config, family=name, lora=LoraSettings(rank=2))
    layers = {}
    for module_name, module in actor.model.named_modules():
        found = re.search(r"\.layers\.(\d+)\.(.*)$", module_name)
        if found and isinstance(module, torch.nn.Linear) and "lora_" not in module_name:
            layers.setdefault(int(found[1]), set()).add(found[2].removesuffix(".base_layer").split(".")[-1])
    assert len(layers) == config.num_hidden_layers
    for linears in layers.values():
        assert linears == set(fam.targets())


def _chat_tokenizer():
    tok = tiny.tokenizer("llama")
    tok.pad_token = tok.eos_token
    tok.chat_template = tiny.CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(name)``: the family's tiny published-like checkpoint (bf16 weights), written once."""
    saved: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in saved:
            saved[name] = tiny._save(PUBLISHED[name](), _chat_tokenizer(), tmp_path_factory.mktemp(name), seed=0,
                                     dtype=torch.bfloat16)
        return saved[name]

    return get


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_the_checkpoint_loads_with_its_features_and_fp32_masters(name, checkpoint):
    """bf16 on disk, fp32 weights to train on CPU; tied embeddings stay one tensor; the config keeps the window,
    soft-capping and KV heads that make the family what it is."""
    want = PUBLISHED[name]()
    actor = Actor.from_pretrained(checkpoint(name), family=name)
    lm = actor.base_lm
    assert actor.source_dtype == torch.bfloat16 and {p.dtype for p in lm.parameters()} == {torch.float32}
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert tied == want.tie_word_embeddings
    for field in ("num_key_value_heads", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                  "layer_types", "pad_token_id", "eos_token_id"):
        assert getattr(lm.config, field, None) == getattr(want, field, None), field
    assert lm.config.pad_token_id == lm.config.eos_token_id


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _metrics(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("split") != "eval"]


_COMMON = ["--batch_size", "4", "--accumulation_steps", "1", "--max_len", "64", "--log_interval", "1",
           "--eval_ratio", "0"]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_sft_lowers_the_loss(name, checkpoint, tmp_path):
    talks = [[("Say hi.", "Hi!"), ("And bye?", "Bye now.")], [("2+3?", "5")],
             [("Count to three.", "One, two, three.")], [("Name a color.", "Blue, like the sky over the quiet harbor.")]]
    records = [{"messages": [{"role": r, "content": c} for q, a in talk for r, c in (("user", q), ("assistant", a))]}
               for talk in talks] * 4
    data, out = _jsonl(tmp_path / "sft.jsonl", records), tmp_path / "sft"
    load_script("examples/train_sft.py").main(
        ["--pretrain", str(checkpoint(name)), "--model", name, "--dataset", str(data), "--max_steps", "8",
         "--max_epochs", "8", "--lr", "1e-2", "--lr_scheduler", "constant", "--save_path", str(out), *_COMMON])
    losses = [r["loss"] for r in _metrics(out) if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 1.0, losses  # from ln(32000) = 10.4
    saved = AutoConfig.from_pretrained(out)  # saved in the checkpoint's dtype, with its features
    assert saved.model_type == PUBLISHED[name]().model_type and str(saved.dtype).endswith("bfloat16")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_one_dpo_step_with_lora(name, checkpoint, tmp_path):
    records = [{"prompt": "Tell me about the number " + "one two " * n, "chosen": "It is " + "fine " * (n % 3 + 1),
                "rejected": "No" + " no" * (n % 4)} for n in range(1, 5)]
    data, out = _jsonl(tmp_path / "pairs.jsonl", records), tmp_path / "dpo"
    load_script("examples/train_dpo.py").main(
        ["--pretrain", str(checkpoint(name)), "--model", name, "--dataset", str(data), "--max_steps", "1",
         "--max_epochs", "1", "--lr", "1e-3", "--lora_rank", "4", "--save_path", str(out), *_COMMON])
    (step,) = [r for r in _metrics(out) if "loss" in r]
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as its reference
    assert step["grad_norm"] > 0 and (out / "config.json").is_file()


def length_reward(prompts, responses, **_):
    return [len(r) / 16 for r in responses]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_one_grpo_step(name, checkpoint, tmp_path):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Say hi.", "Name a color.", "2+3?", "Bye?")])
    hist = load_script("examples/train_prompts.py").main(
        ["--pretrain", str(checkpoint(name)), "--model", name, "--prompt_dataset", str(prompts), "--algo", "grpo",
         "--n_samples_per_prompt", "2", "--num_episodes", "1", "--num_collect_steps", "1", "--num_update_steps", "1",
         "--experience_batch_size", "4", "--train_batch_size", "8", "--max_new_tokens", "6",
         "--reward_fn", f"{__name__}:length_reward", "--save_path", str(tmp_path / "grpo")])
    assert hist[-1]["training/optim_steps"] == 1 and math.isfinite(hist[-1]["actor/pg_loss"])
    assert hist[-1]["critic/score/std"] > 0 and hist[-1]["actor/grad_norm"] > 0  # rewards differ: a real update
    assert "actor/kl_loss" in hist[-1] and not any(k.startswith("critic/v") for k in hist[-1])


@pytest.mark.parametrize("name", REMOTE)
def test_remote_code_families_need_trust_remote_code(name, tmp_path):
    with pytest.raises(UsageError, match=f"transformers has no {name} class.*--trust_remote_code"):
        check_remote_code(name, False)
    check_remote_code(name, True)
    check_remote_code("llama", False)
    records = _jsonl(tmp_path / "sft.jsonl", [{"instruction": "Say hi.", "output": "Hi!"}])
    with pytest.raises(UsageError, match=f"--model {name}: transformers has no"):  # before any model loads
        load_script("examples/train_sft.py").main(
            ["--pretrain", str(tmp_path / "absent"), "--model", name, "--dataset", str(records)])


def test_readme_families_table_is_the_registry():
    """README's "Model families" table is the registry, row for row."""
    section = (ROOT / "README.md").read_text().split("## Model families\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]

    def column(f, flag):
        return "per model_type" if not f.model_types else "yes" if flag else "no"

    want = [f"| `{f.name}` | {', '.join(f.model_types) or 'any'} | "
            f"{f.lora_target_modules if f.lora_target_modules == 'all-linear' else ', '.join(f.lora_target_modules)} | "
            f"{column(f, f.packing_model_types)} | {column(f, f.tp_plan)} | {f.description} |" for f in FAMILIES.values()]
    assert rows[1:] == want and rows[0].startswith("| `--model` |")
