"""coati: RLHF (SFT, reward model, PPO) for Hugging Face causal language models."""
import logging

__version__ = "0.1.0"

# bitsandbytes, which peft imports whenever it is installed, warns on every start on a CPU with AVX512-BF16 that
# it could not fetch a faster 4-bit kernel from the Hugging Face Hub (`pip install kernels`, then a download at
# run time, which coati never makes) and uses its own; with HF_HUB_OFFLINE set, `kernels` first says it skips the
# publisher check of that repository. Noise before every script's first line, dropped here (coati's scripts
# import coati before anything imports peft, and only LoRA / quantized runs import peft at all).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "from kernels-community" not in record.getMessage())
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "'kernels-community/" not in record.getMessage())
