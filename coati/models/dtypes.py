"""The one table of dtype names coati's flags and configs use, the ``from_pretrained`` dtype keyword and the Auto
class a config loads with (a leaf: imports only torch and, lazily, transformers)."""
from __future__ import annotations

from typing import Any

import torch

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def to_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """``name`` (any key of :data:`DTYPES`, any case) as a torch dtype; ``what`` names it in the error."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key not in DTYPES:
        raise ValueError(f"unknown {what} {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_kwargs(torch_dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` dtype keyword: ``dtype`` on transformers >= 4.56, ``torch_dtype`` before."""
    if torch_dtype is None:
        return {}
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        torch_dtype = to_dtype(torch_dtype)
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch_dtype}


def auto_lm_class(config: Any) -> Any:
    """The transformers Auto class of ``config``'s LM: ``AutoModelForSeq2SeqLM`` for an encoder-decoder (T5,
    BART), else ``AutoModelForCausalLM``."""
    import transformers

    seq2seq = getattr(config, "is_encoder_decoder", False)
    return transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
