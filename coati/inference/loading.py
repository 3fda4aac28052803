"""Load a trained model dir for inference: full weights or a peft LoRA adapter dir, in a chosen precision.

Quantization goes through transformers' own integrations (bitsandbytes int8 / NF4, GPTQ) so a dir saved by
coati's trainers loads the same way it would in plain transformers.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from coati.errors import MissingInputError, UsageError
# QuantizationUnavailable and cpu_4bit_skip_modules live with the training-side quantization; re-exported here
from coati.models.dtypes import auto_lm_class, to_dtype
from coati.models.loading import ATTN_IMPLEMENTATIONS, attention_kwargs
from coati.models.quant import QuantizationUnavailable, bnb_config, cpu_4bit_skip_modules  # noqa: F401

QUANT_MODES = ("8bit", "4bit", "gptq")
logger = logging.getLogger(__name__)


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is fp32 on CPU (fast and exact there) and bf16 on GPUs that support it, else fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return to_dtype(dtype)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _adapter_base(path: Path, base_model: str | None) -> str:
    if base_model:
        return base_model
    cfg = json.loads((path / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path; pass base_model")
    if not Path(base).is_absolute() and (path / base).exists():
        return str(path / base)
    return base


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))


def _check_gptq_backend() -> None:
    have = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
    if not have("optimum") or not (have("gptqmodel") or have("auto_gptq")):
        raise QuantizationUnavailable(
            "GPTQ 4-bit needs transformers' GPTQ backend: `pip install optimum gptqmodel` (GPU build). "
            "Without it use --quant 4bit (bitsandbytes NF4) or --quant 8bit.")


def _config_quant_method(path: str) -> str | None:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    return qc.get("quant_method")


def quantization_config(quant: str | None, compute_dtype: torch.dtype, *, tokenizer=None,
                        calibration: list[str] | None = None, skip_modules: list[str] | None = None) -> Any:
    """The transformers quantization config for `quant` (None -> None)."""
    if quant is None:
        return None
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    if quant == "gptq":
        _check_gptq_backend()
        from transformers import GPTQConfig

        return GPTQConfig(bits=4, dataset=calibration or "c4", tokenizer=tokenizer)
    return bnb_config(quant, compute_dtype, skip_modules)


def load_model(path: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto", quant: str | None = None,
               device: str | None = "auto", trust_remote_code: bool = False, base_model: str | None = None,
               merge_adapter: bool = True, gptq_calibration: list[str] | None = None, attn_implementation: str = "sdpa",
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `path` (a model dir or a LoRA adapter dir) and its tokenizer, ready for `generate` in eval mode.

    A LoRA adapter is merged into full-precision bases (one matmul per layer instead of two) and kept as a
    peft wrapper over quantized bases, where merging would round the adapter into the quantization grid.
    An `attn_implementation` the device cannot run is refused before anything loads (``attention_kwargs``).
    """
    path = Path(path)
    dev = resolve_device(device)
    attn = attention_kwargs(attn_implementation, dev, train=False)
    torch_dtype = resolve_dtype(dtype, dev)
    adapter = is_adapter_dir(path)
    base_path = _adapter_base(path, base_model) if adapter else str(path)
    tok_path = path if (not adapter or _has_tokenizer(path)) else base_path
    tokenizer = load_tokenizer(tok_path, trust_remote_code)

    if _config_quant_method(base_path) == "gptq":
        _check_gptq_backend()
    skips = cpu_4bit_skip_modules(base_path, trust_remote_code) if quant == "4bit" and dev.type == "cpu" else None
    qconfig = quantization_config(quant, torch_dtype, tokenizer=tokenizer, calibration=gptq_calibration,
                                  skip_modules=skips)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype, **attn}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    model = _from_pretrained(base_path, kwargs)
    if qconfig is None:
        model.to(dev)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
        if merge_adapter and qconfig is None:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A model dir's tokenizer, padding with EOS where it has no pad token (batched generation pads)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(path: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    """A causal LM, or an encoder-decoder (T5, BART: ``generate`` then returns the answer's tokens without the
    prompt). transformers>=4.56 names the precision argument `dtype`; older releases call it `torch_dtype`."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.56"):
        kwargs = dict(kwargs)
        kwargs["torch_dtype"] = kwargs.pop("dtype")
    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    return auto_lm_class(config).from_pretrained(path, **kwargs)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def add_model_args(parser, path_flag: bool = False) -> None:
    """The model-loading flags shared by inference/chat.py, server.py, generate_answers.py and benchmark.py;
    ``path_flag``: the model dir may also come as ``--model_path`` (Colossal-LLaMA's and LLM4Academic's
    spelling; :func:`model_path_from_args` takes either)."""
    parser.add_argument("model_path", nargs="?" if path_flag else None, default=None,
                        help="trained model dir, or a LoRA adapter dir (adapter_config.json)")
    if path_flag:
        parser.add_argument("--model_path", dest="model_path_flag", metavar="MODEL_PATH", default=None,
                            help="the model dir, as a flag")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights / compute precision; auto = fp32 on CPU, bf16 (else fp16) on GPU")
    parser.add_argument("--quant", default=None, choices=QUANT_MODES,
                        help="8bit = bitsandbytes int8, 4bit = bitsandbytes NF4, gptq = 4-bit GPTQ "
                             "(needs optimum + gptqmodel)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--base_model", default=None, help="base model for an adapter dir (default: the "
                        "base_model_name_or_path in adapter_config.json)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow model code from the model dir to run (off unless given)")
    parser.add_argument("--attn_implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS,
                        help="attention kernel: sdpa = PyTorch's (an architecture without it keeps its own); eager; "
                             "flash_attention_2 / _3 need a CUDA --device and flash-attn (or kernels); flex_attention")
    parser.add_argument("--prompt_template", default="auto", choices=["auto", "alpaca", "chatml", "none"],
                        help="chat prompt format; must match the one used in training")


def model_path_from_args(parser, args) -> str:
    """The model dir given once, as MODEL_PATH or as --model_path (a parser error otherwise)."""
    if (args.model_path is None) == (args.model_path_flag is None):
        parser.error("give the model dir once: as MODEL_PATH or as --model_path")
    args.model_path = args.model_path or args.model_path_flag
    return args.model_path


def add_sampling_args(parser, *, max_new_tokens: int, temperature: float, top_p: float,
                      seed: int | None, seed_help: str) -> None:
    """The sampling flags of chat.py and generate_answers.py, each script with its own defaults."""
    from ..utils.config import Bounded

    parser.add_argument("--max_new_tokens", type=Bounded(int, ">= 1"), default=max_new_tokens,
                        help="most tokens an answer has")
    parser.add_argument("--temperature", type=Bounded(float, ">= 0"), default=temperature, help="0 = greedy")
    parser.add_argument("--top_p", type=Bounded(float, "(0, 1]"), default=top_p, help="nucleus sampling (1 = off)")
    parser.add_argument("--top_k", type=Bounded(int, ">= 0"), default=0, help="top-k sampling (0 = off)")
    parser.add_argument("--repetition_penalty", type=Bounded(float, "> 0"), default=1.0,
                        help="1 = off; > 1 discourages repeats")
    parser.add_argument("--seed", type=Bounded(int, ">= 0"), default=seed, help=seed_help)


def load_from_args(args) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_model` with the flags of :func:`add_model_args`."""
    if not Path(args.model_path).exists():
        raise MissingInputError(f"{args.model_path}: no such model directory")
    return load_model(args.model_path, dtype=args.dtype, quant=args.quant, device=args.device,
                      trust_remote_code=args.trust_remote_code, base_model=args.base_model,
                      attn_implementation=args.attn_implementation)
