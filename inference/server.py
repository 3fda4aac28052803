"""OpenAI-compatible server for a trained coati model (`pip install coati[serve]`).

    python inference/server.py MODEL_PATH --host 127.0.0.1 --port 8000 [--quant 8bit|4bit] [--api_key KEY]
    python inference/server.py MODEL_PATH --engine vllm          # pip install 'coati[vllm]'

Then any OpenAI client works, e.g. `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`.
--engine hf: requests wait in one queue; a background thread runs up to --max_batch_size of them (same
sampling settings, streaming or not) as one left-padded `generate`. --engine vllm: vLLM's continuous
batching, up to --max_batch_size requests per step, each joining and leaving the batch on its own. Both
engines answer with the same API, limits and errors. See inference/README.md for routes and limits.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from coati.inference.engine import BatchingEngine, ServingEngine  # noqa: E402
from coati.inference.generation import Generator  # noqa: E402
from coati.errors import MissingDependencyError, MissingInputError, UsageError  # noqa: E402
from coati.inference.loading import (add_model_args, is_adapter_dir, load_from_args, load_tokenizer,  # noqa: E402
                                     resolve_device, resolve_dtype)
from coati import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf = batched HF generate in this process; vllm = vLLM's continuous batching (pip install "
                        "'coati[vllm]'; full model dirs, no --quant)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=cli.Bounded(int, "[0, 65535]"), default=8000, help="port to listen on (0 = any free one)")
    p.add_argument("--api_key", default=os.environ.get("COATI_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $COATI_API_KEY, else no key)")
    p.add_argument("--served_model_name", default=None, help="model id clients send (default: dir name)")
    p.add_argument("--max_prompt_tokens", type=cli.Bounded(int, ">= 1"), default=2048, help="longest prompt accepted (400 beyond)")
    p.add_argument("--max_tokens_limit", type=cli.Bounded(int, ">= 1"), default=512, help="largest max_tokens a request may ask")
    p.add_argument("--max_concurrent", type=cli.Bounded(int, ">= 1"), default=64, help="requests in flight before 429")
    p.add_argument("--max_batch_size", type=cli.Bounded(int, ">= 1"), default=8,
                   help="requests generated together in one batch (--engine vllm: in one step)")
    p.add_argument("--batch_wait_ms", type=cli.Bounded(float, ">= 0"), default=5.0,
                   help="how long the worker waits for more requests before starting a batch (--engine hf)")
    p.add_argument("--gpu_memory_utilization", type=cli.Bounded(float, "(0, 1]"), default=0.9,
                   help="--engine vllm: share of GPU memory vLLM takes (weights + KV cache)")
    p.add_argument("--log_level", default="info", help="uvicorn log level")
    return p


def build_engine(args: argparse.Namespace) -> ServingEngine:
    """The engine of --engine: HF generate on the loaded model, or vLLM on the model dir."""
    if args.engine == "hf":
        model, tokenizer = load_from_args(args)
        return BatchingEngine(Generator(model, tokenizer), max_batch_size=args.max_batch_size,
                              batch_wait_s=args.batch_wait_ms / 1000)
    from coati.inference.vllm_engine import VLLMServingEngine, import_vllm

    import_vllm()
    if args.quant:
        raise UsageError("--engine vllm serves full-precision model dirs: drop --quant (or use --engine hf)")
    if args.device != "auto":
        raise UsageError("--engine vllm places the model itself: drop --device (or use --engine hf)")
    if not os.path.isdir(args.model_path):
        raise MissingInputError(f"{args.model_path}: no such model directory")
    if is_adapter_dir(args.model_path):
        raise UsageError(f"--engine vllm serves full model dirs and {args.model_path} is a LoRA adapter: merge it "
                         f"(save with --merge_lora_weights) or use --engine hf")
    device = resolve_device("auto")
    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")  # auto: fp32 on CPU, as --engine hf
    return VLLMServingEngine(args.model_path, load_tokenizer(args.model_path, args.trust_remote_code), dtype=dtype,
                             max_num_seqs=args.max_batch_size, trust_remote_code=args.trust_remote_code,
                             gpu_memory_utilization=args.gpu_memory_utilization,
                             enforce_eager=device.type == "cpu")


def build_app(args: argparse.Namespace):
    from coati.inference.server import ServerConfig, create_app

    engine = build_engine(args)
    path = args.model_path.rstrip("/")
    name = args.served_model_name or os.path.basename(path)
    config = ServerConfig(model_name=name, aliases=(path,), api_key=args.api_key,
                          prompt_template=args.prompt_template, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens_limit=args.max_tokens_limit, max_concurrent=args.max_concurrent)
    return create_app(engine, config)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("the server needs FastAPI and uvicorn: pip install 'coati[serve]'") from None
    app = build_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    cli.run(main)
