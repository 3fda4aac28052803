"""Load benchmark for the OpenAI-compatible server: concurrent streaming clients, one JSON line of results.

Against a running server:
    python inference/benchmark.py --url http://127.0.0.1:8000 [--api_key KEY] --num_requests 64 --concurrency 8

Or start the server in this process (uvicorn thread on a free loopback port) for a model dir:
    python inference/benchmark.py --model_path MODEL_DIR [--quant 8bit|4bit] [--dtype bf16] --num_requests 64

Each client sends streaming /v1/completions requests (distinct prompts, `ignore_eos` so every answer is
exactly --max_tokens long unless --allow_eos) and records the time to the first text and to the end.
Printed: requests/s, completion tokens/s, latency p50/p95 and time-to-first-token p50/p95 (seconds).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(client, url: str, headers: dict, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    usage = None
    text = []
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return {"error": f"HTTP {resp.status_code}: {resp.text[:200]}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"].get("message")}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    if first is None:
                        first = time.perf_counter()
                    text.append(choice["text"])
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start,
            "completion_tokens": (usage or {}).get("completion_tokens", 0),
            "prompt_tokens": (usage or {}).get("prompt_tokens", 0), "text": "".join(text)}


async def run_load(base_url: str, *, model: str | None, api_key: str | None, num_requests: int,
                   concurrency: int, max_tokens: int, temperature: float = 0.0, ignore_eos: bool = True,
                   prompt_words: int = 16, timeout: float = 600.0) -> dict:
    """Send `num_requests` streaming completions from `concurrency` clients; return the summary dict."""
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    jobs: asyncio.Queue = asyncio.Queue()
    for i in range(num_requests):
        jobs.put_nowait(i)
    results: list[dict] = []

    async def client_loop(client):
        while True:
            try:
                i = jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            words = " ".join(f"w{(i * 31 + k) % 97}" for k in range(prompt_words))
            body = {"prompt": f"Request {i}: {words}", "max_tokens": max_tokens, "temperature": temperature,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
            if model:
                body["model"] = model
            try:
                results.append(await _one(client, url, headers, body))
            except Exception as err:  # counted, not fatal: a load test reports failures
                results.append({"error": repr(err)})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    rnd = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "concurrency": concurrency, "max_tokens": max_tokens, "wall_s": rnd(wall),
        "requests_per_s": rnd(len(ok) / wall), "tokens_per_s": rnd(tokens / wall),
        "completion_tokens": tokens, "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "latency_p50_s": rnd(percentile(lat, 50)), "latency_p95_s": rnd(percentile(lat, 95)),
        "latency_mean_s": rnd(statistics.fmean(lat)) if lat else None,
        "ttft_p50_s": rnd(percentile(ttft, 50)), "ttft_p95_s": rnd(percentile(ttft, 95)),
        "first_error": next((r["error"] for r in results if "error" in r), None),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_in_process(args) -> tuple[str, object, dict]:
    """Start server.py's app for args.model_path in a uvicorn thread; returns (url, server, info)."""
    import torch
    import uvicorn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import server as server_cli

    sargs = server_cli.build_parser().parse_args(
        [args.model_path, "--dtype", args.dtype, "--device", args.device, "--max_batch_size",
         str(args.max_batch_size), "--max_concurrent", str(max(64, args.concurrency)),
         "--max_tokens_limit", str(max(512, args.max_tokens))]
        + (["--quant", args.quant] if args.quant else [])
        + (["--trust_remote_code"] if args.trust_remote_code else []))
    app = server_cli.build_app(sargs)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    deadline = time.time() + 120
    while not srv.started:
        if time.time() > deadline:
            raise RuntimeError("in-process server did not start")
        time.sleep(0.05)
    info = {"model_path": args.model_path, "dtype": args.dtype, "quant": args.quant,
            "device": "cuda" if (args.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu",
            "torch_threads": torch.get_num_threads(), "max_batch_size": args.max_batch_size}
    return f"http://127.0.0.1:{port}", srv, info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model_path", help="serve this model dir in-process for the run")
    p.add_argument("--api_key", default=os.environ.get("COATI_API_KEY"))
    p.add_argument("--model", default=None, help="model id to send (default: none, the server's own)")
    p.add_argument("--num_requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--prompt_words", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--allow_eos", action="store_true", help="let answers end at EOS (default: ignore EOS)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before the run")
    # in-process server settings
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quant", default=None, choices=["8bit", "4bit", "gptq"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--trust_remote_code", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    srv, info = None, {"url": args.url}
    url = args.url
    if args.model_path:
        url, srv, info = start_in_process(args)
    kw = dict(model=args.model, api_key=args.api_key, max_tokens=args.max_tokens,
              temperature=args.temperature, ignore_eos=not args.allow_eos, prompt_words=args.prompt_words)
    try:
        if args.warmup:
            asyncio.run(run_load(url, num_requests=args.warmup, concurrency=1, **kw))
        result = asyncio.run(run_load(url, num_requests=args.num_requests, concurrency=args.concurrency, **kw))
    finally:
        if srv is not None:
            srv.should_exit = True
    out = {"benchmark": "inference_server", **result, **info}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    from coati import cli

    cli.run(main)
