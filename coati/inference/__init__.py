"""Inference for trained coati models: loading (full / LoRA adapter, fp32 / bf16 / fp16, 8-bit, 4-bit),
batched streaming generation, and the request engine behind the OpenAI-compatible server.

The FastAPI app lives in `coati.inference.server` (imported only when serving: `pip install coati[serve]`).
"""
from coati.inference.engine import BatchingEngine
from coati.inference.generation import Completion, Generator, SamplingParams, encode_chat, encode_text
from coati.inference.loading import QuantizationUnavailable, load_model

__all__ = ["BatchingEngine", "Completion", "Generator", "QuantizationUnavailable", "SamplingParams",
           "encode_chat", "encode_text", "load_model"]
