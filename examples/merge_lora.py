"""Export a LoRA adapter as a full-precision model dir that plain transformers loads.

    python examples/merge_lora.py ADAPTER_DIR OUT_DIR                 # merge into the original base weights
    python examples/merge_lora.py ADAPTER_DIR OUT_DIR --quant 4bit    # adapter trained with --quant 4bit

ADAPTER_DIR is a peft adapter dir: a model saved with ``--no-merge_lora_weights`` or a checkpoint
(``checkpoints/step_N/actor`` ...). The adapter alone stays loadable with peft
(``PeftModel.from_pretrained(base, ADAPTER_DIR)``); this writes ``AutoModelForCausalLM``-ready weights plus
the tokenizer and, for critics and reward models, ``value_head.safetensors``.

An adapter trained on a quantized base (``--quant``) learned to correct *that* base: with the same ``--quant``
the base is quantized as in training and dequantized before the merge, so the export reproduces the trained
model; without it the adapter lands on the original weights (they differ by the quantization error).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from coati.errors import UsageError
from coati.models.dtypes import auto_lm_class, dtype_kwargs, to_dtype
from coati.models.quant import QUANT_MODES, bnb_config, config_dtype, full_precision_copy
from coati import cli

VALUE_HEAD_FILE = "value_head.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="peft adapter dir (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("output", help="dir to write the merged model to")
    p.add_argument("--base", default=None,
                   help="base model dir (default: base_model_name_or_path in adapter_config.json)")
    p.add_argument("--quant", default=None, choices=QUANT_MODES,
                   help="the --quant the adapter was trained with: merge into that quantized base, dequantized")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the written weights; auto = the base model's")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the base dir")
    return p


def merge(adapter: str | Path, output: str | Path, *, base: str | None = None, quant: str | None = None,
          dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Merge ``adapter`` into its base (see the module doc) and write ``output``; returns ``output``."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoTokenizer

    adapter, output = Path(adapter), Path(output)
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{adapter}: no adapter_config.json (is it already a merged model dir?)")
    base = base or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if not base:
        raise UsageError(f"{adapter}: adapter_config.json names no base model; pass --base")
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    out_dtype = config_dtype(config) if dtype == "auto" else to_dtype(dtype)
    kwargs = dict(trust_remote_code=trust_remote_code, **dtype_kwargs(torch.float32))
    if quant is not None:
        # quantized on the CPU exactly as in training; only dequantized here, so no kernel-shape limits apply
        kwargs.update(quantization_config=bnb_config(quant, torch.float32), device_map={"": "cpu"})
    model = PeftModel.from_pretrained(auto_lm_class(config).from_pretrained(base, **kwargs), str(adapter))
    merged = full_precision_copy(model, out_dtype) if quant else model.merge_and_unload().to(out_dtype)
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output))
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code).save_pretrained(output)
    if (adapter / VALUE_HEAD_FILE).is_file():
        shutil.copy2(adapter / VALUE_HEAD_FILE, output / VALUE_HEAD_FILE)
    return output


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = merge(args.adapter, args.output, base=args.base, quant=args.quant, dtype=args.dtype,
                trust_remote_code=args.trust_remote_code)
    print(f"merged {args.adapter} -> {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
