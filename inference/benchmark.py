"""Load benchmark for the OpenAI-compatible server: concurrent streaming clients, one JSON line of results.

Against a running server:
    python inference/benchmark.py --url http://127.0.0.1:8000 [--api_key KEY] --num_requests 64 --concurrency 8

Or start the server in this process (uvicorn thread on a free loopback port) for a model dir:
    python inference/benchmark.py --model_path MODEL_DIR [--quant 8bit|4bit] [--dtype bf16] --num_requests 64

Each client sends streaming /v1/completions requests (distinct prompts, `ignore_eos` so every answer is
exactly --max_tokens long unless --allow_eos) and records the time to the first text and to the end.
Printed: requests/s, completion tokens/s, latency p50/p95/p99 and time-to-first-token p50/p95 (seconds).

--mixed sends the load a server meets from many users instead: streaming and plain, chat and completions,
clients that leave mid-stream and malformed requests; see `job`. Latency and tokens/s count the answered
requests; the server's /health counters show whether the clients that left stopped their generation, and
an in-process run records its RSS when idle, at peak and after the load.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import socket
import statistics
import sys
import threading
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from coati.utils.config import Bounded, Parser  # noqa: E402


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(client, url: str, headers: dict, body: dict, leave: bool = False) -> dict:
    """One streaming request; `leave` closes the connection right after the first text arrives."""
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
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter()
                    text.append(piece)
            if leave and text:
                return {"left": True}
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start,
            "completion_tokens": (usage or {}).get("completion_tokens", 0),
            "prompt_tokens": (usage or {}).get("prompt_tokens", 0), "text": "".join(text)}


async def _plain(client, url: str, headers: dict, body: dict) -> dict:
    """One non-streaming request; its time to first token is its latency."""
    start = time.perf_counter()
    resp = await client.post(url, json=body, headers=headers)
    if resp.status_code != 200:
        return {"error": f"HTTP {resp.status_code}: {resp.text[:200]}"}
    end, usage = time.perf_counter(), resp.json()["usage"]
    return {"latency": end - start, "ttft": end - start, "completion_tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"]}


# bodies a server must refuse with 400 in OpenAI's error shape (the --mixed load sends them in turn)
MALFORMED = [("/v1/completions", b'{"prompt": "hi", '),
             ("/v1/completions", b'{"prompt": "hi", "temperature": "hot"}'),
             ("/v1/chat/completions", b'{"messages": []}'),
             ("/v1/completions", b'{"prompt": "hi", "n": 2}')]


async def _malformed(client, url: str, headers: dict, raw: bytes) -> dict:
    resp = await client.post(url, content=raw, headers={**headers, "Content-Type": "application/json"})
    try:
        shaped = set(resp.json()["error"]) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        shaped = False
    return {"rejected": True} if resp.status_code == 400 and shaped else {
        "error": f"malformed request got HTTP {resp.status_code}: {resp.text[:200]}"}


def job(i: int, mixed: bool, text: str, sampling: dict) -> tuple[str, str, dict | bytes]:
    """Request i as (kind, path, body). Plain load: streaming completions. Mixed load, per 8 requests:
    3 streaming and 3 plain well-formed ones (chat and completions in turn), 1 streaming client that leaves
    after the first text, 1 malformed."""
    if not mixed:
        return "ok", "/v1/completions", {"prompt": text, "stream": True, **sampling}
    if i % 8 == 7:
        path, raw = MALFORMED[(i // 8) % len(MALFORMED)]
        return "bad", path, raw
    stream = i % 2 == 0
    kind = "leave" if i % 8 == 6 else "ok"
    chat = (i // 2) % 2 == 1
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    if not stream:
        sampling = {k: v for k, v in sampling.items() if k != "stream_options"}
    return kind, "/v1/chat/completions" if chat else "/v1/completions", {**body, "stream": stream, **sampling}


async def _send(client, base: str, headers: dict, kind: str, path: str, body) -> dict:
    if kind == "bad":
        return await _malformed(client, base + path, headers, body)
    if body["stream"]:
        return await _one(client, base + path, headers, body, leave=kind == "leave")
    return await _plain(client, base + path, headers, body)


async def run_load(base_url: str, *, model: str | None, api_key: str | None, num_requests: int,
                   concurrency: int, max_tokens: int, temperature: float = 0.0, ignore_eos: bool = True,
                   prompt_words: int = 16, timeout: float = 600.0, mixed: bool = False, rounds: int = 1,
                   after_round: Callable[[], None] | None = None) -> dict:
    """Send `num_requests` requests (see `job`) from `concurrency` clients, `rounds` times (calling
    `after_round` in a thread after each, outside the timed part); return the summary dict of all rounds."""
    import httpx

    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "ignore_eos": ignore_eos,
                "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    jobs: asyncio.Queue = asyncio.Queue()
    results: list[dict] = []

    async def client_loop(client):
        while not jobs.empty():
            try:
                results.append(await _send(client, base, headers, *jobs.get_nowait()))
            except Exception as err:  # counted, not fatal: a load test reports failures
                results.append({"error": repr(err)})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    wall = 0.0
    for _ in range(rounds):
        for i in range(num_requests):
            words = " ".join(f"w{(i * 31 + k) % 97}" for k in range(prompt_words))
            jobs.put_nowait(job(i, mixed, f"Request {i}: {words}", sampling))
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
            wall += time.perf_counter() - t0
        if after_round is not None:
            await asyncio.to_thread(after_round)
    return _summary(results, wall, concurrency, max_tokens, mixed)


def _summary(results: list[dict], wall: float, concurrency: int, max_tokens: int, mixed: bool) -> dict:
    ok = [r for r in results if "latency" in r]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    errors = [r["error"] for r in results if "error" in r]
    rnd = lambda x: None if x is None else round(x, 4)  # noqa: E731
    out = {
        "requests": len(results), "ok": len(ok), "errors": len(errors),
        "concurrency": concurrency, "max_tokens": max_tokens, "wall_s": rnd(wall),
        "requests_per_s": rnd(len(ok) / wall), "tokens_per_s": rnd(tokens / wall),
        "completion_tokens": tokens, "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "latency_p50_s": rnd(percentile(lat, 50)), "latency_p95_s": rnd(percentile(lat, 95)),
        "latency_p99_s": rnd(percentile(lat, 99)), "latency_mean_s": rnd(statistics.fmean(lat)) if lat else None,
        "ttft_p50_s": rnd(percentile(ttft, 50)), "ttft_p95_s": rnd(percentile(ttft, 95)),
        "first_error": errors[0] if errors else None,
    }
    if mixed:
        out.update(rejected_400=sum("rejected" in r for r in results),
                   left_mid_stream=sum("left" in r for r in results))
    return out


def _health(url: str) -> dict:
    import httpx

    return httpx.get(url.rstrip("/") + "/health", timeout=30).json()


def _settle(url: str, timeout: float = 60.0) -> dict:
    """/health once no request is in flight or held by the engine (or after `timeout`)."""
    deadline = time.time() + timeout
    while True:
        health = _health(url)
        if (health.get("in_flight"), health.get("active", 0)) == (0, 0) or time.time() > deadline:
            return health
        time.sleep(0.05)


def rss_mb() -> float | None:
    """This process's resident memory (MB) from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1024, 1)


class PeakRSS:
    """Samples `rss_mb` every `every_s` in a thread while in a `with` block; `.peak` is the largest."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.peak, self._stop = every_s, rss_mb(), threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


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
        + ["--attn_implementation", args.attn_implementation]
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
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model_path", help="serve this model dir in-process for the run")
    p.add_argument("--api_key", default=os.environ.get("COATI_API_KEY"), help="bearer key (default: $COATI_API_KEY)")
    p.add_argument("--model", default=None, help="model id to send (default: none, the server's own)")
    p.add_argument("--num_requests", type=Bounded(int, ">= 1"), default=32, help="requests timed (per round)")
    p.add_argument("--concurrency", type=Bounded(int, ">= 1"), default=8, help="clients sending at once")
    p.add_argument("--max_tokens", type=Bounded(int, ">= 1"), default=32, help="tokens each answer asks for")
    p.add_argument("--prompt_words", type=Bounded(int, ">= 1"), default=16, help="words of each (distinct) prompt")
    p.add_argument("--temperature", type=Bounded(float, "[0, 2]"), default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--allow_eos", action="store_true", help="let answers end at EOS (default: ignore EOS)")
    p.add_argument("--warmup", type=Bounded(int, ">= 0"), default=2, help="requests sent (and not counted) before the run")
    p.add_argument("--mixed", action="store_true",
                   help="mixed load: per 8 requests 3 streaming and 3 plain well-formed ones (chat and completions), "
                        "1 streaming client that leaves after its first text, 1 malformed request (must get 400); "
                        "adds 400 / left counts, the server's /health counters (cancelled requests, tokens "
                        "generated for clients that left) and, with --model_path, this process's RSS idle / "
                        "peak / after")
    p.add_argument("--rounds", type=Bounded(int, ">= 1"), default=1,
                   help="send the load this many times (figures pool all rounds); with --mixed the RSS after each "
                        "round is listed: a level that rises round after round is a leak, one that stays is not")
    # in-process server settings
    p.add_argument("--dtype", default="auto", help="in-process server: weights / compute precision (auto, fp32, bf16, fp16)")
    p.add_argument("--quant", default=None, choices=["8bit", "4bit", "gptq"], help="in-process server: quantized loading")
    p.add_argument("--attn_implementation", default="sdpa",
                   help="in-process server: attention kernel (server.py's --attn_implementation)")
    p.add_argument("--device", default="auto", help="in-process server: auto, cpu, cuda or cuda:N")
    p.add_argument("--max_batch_size", type=Bounded(int, ">= 1"), default=8, help="in-process server: rows per batch")
    p.add_argument("--trust_remote_code", action="store_true", help="in-process server: allow model code from the model dir")
    return p


def _server_side(before: dict, after: dict, result: dict) -> dict:
    """What the server's /health counters say the mixed load cost: requests cancelled because their client
    left, and the tokens generated for those clients (all generated tokens less the answered ones)."""
    if "cancelled" not in after:
        return {}
    generated = after["completion_tokens"] - before["completion_tokens"]
    return {"server_cancelled": after["cancelled"] - before["cancelled"], "server_generated_tokens": generated,
            "tokens_for_clients_that_left": generated - result["completion_tokens"],
            "server_active_after": after["active"], "server_in_flight_after": after["in_flight"]}


def _trimmed_rss() -> float | None:
    """RSS after glibc's malloc_trim hands freed heap pages back to the system: what stays above this is
    memory still in use, what goes is memory freed but kept by the allocator. None without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_mb()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    srv, info = None, {"url": args.url}
    url = args.url
    if args.model_path:
        url, srv, info = start_in_process(args)
    kw = dict(model=args.model, api_key=args.api_key, max_tokens=args.max_tokens,
              temperature=args.temperature, ignore_eos=not args.allow_eos, prompt_words=args.prompt_words)
    after: list[float | None] = []
    memory: dict = {}

    def settle() -> None:  # mixed load: RSS once the server holds no request any more
        _settle(url)
        time.sleep(1.0)
        gc.collect()
        after.append(rss_mb())

    try:
        if args.warmup:
            asyncio.run(run_load(url, num_requests=args.warmup, concurrency=1, **kw))
        before = _settle(url) if args.mixed else {}
        gc.collect()
        idle = rss_mb()
        with PeakRSS() as peak:
            result = asyncio.run(run_load(url, num_requests=args.num_requests, concurrency=args.concurrency,
                                          mixed=args.mixed, rounds=args.rounds,
                                          after_round=settle if args.mixed else None, **kw))
        if args.mixed:
            result.update(_server_side(before, _settle(url), result))
            memory = {"rss_idle_mb": idle, "rss_peak_mb": peak.peak, "rss_after_mb": after[-1],
                      "rss_after_each_round_mb": after, "rss_after_malloc_trim_mb": _trimmed_rss()}
    finally:
        if srv is not None:
            srv.should_exit = True
    out = {"benchmark": "inference_server_mixed" if args.mixed else "inference_server", **result,
           **(memory if srv is not None else {}), **info,
           "command": " ".join(["python", "inference/benchmark.py", *argv])}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    from coati import cli

    cli.run(main)
