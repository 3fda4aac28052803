"""inference/: model loading (full, LoRA adapter, bf16, 8-bit, 4-bit), batched/streaming generation, the
OpenAI-compatible server (real `openai` client against a subprocess on loopback), the chat CLI and the
load benchmark. Every generated answer is compared with plain `model.generate` on the same prompt ids."""
from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coati.inference.generation import Generator, SamplingParams, encode_chat, encode_text
from coati.inference.loading import QuantizationUnavailable, load_model
from tests.scripts import load_script

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-coati-test"
MAX_PROMPT, MAX_TOKENS = 64, 24


def _load_script(name: str):
    return load_script(f"inference/{name}.py")


@pytest.fixture(scope="module")
def ref(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def greedy(model, tok, ids: list[int], n: int) -> tuple[list[int], str]:
    """Reference answer: plain HF greedy generate on one unpadded prompt, cut at EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return new, tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine_args() -> list[str]:
    """The server's engine flags; tests/test_vllm_server.py runs this module's server tests with vLLM's."""
    return ["--engine", "hf"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, engine_args):
    """`python inference/server.py` in a subprocess on a free loopback port, with an API key."""
    port = _free_port()
    cmd = [sys.executable, str(REPO / "inference" / "server.py"), str(tiny_llama_dir), "--host", "127.0.0.1",
           "--port", str(port), "--api_key", API_KEY, "--max_prompt_tokens", str(MAX_PROMPT),
           "--max_tokens_limit", str(MAX_TOKENS), "--max_batch_size", "8", "--batch_wait_ms", "20",
           "--log_level", "warning", *engine_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # vLLM's start (model load, KV cache) takes longer than HF's
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("server did not become healthy in 180 s")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def client(server, tiny_llama_dir):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _name(tiny_llama_dir) -> str:
    return Path(tiny_llama_dir).name


def test_completions_greedy_equals_generate_plain_and_streamed(client, ref, tiny_llama_dir):
    model, tok = ref
    prompt = "The capital of France is"
    ids = encode_text(tok, prompt)
    assert ids[0] == tok.bos_token_id  # same BOS rule as the training data
    want_ids, want = greedy(model, tok, ids, 12)
    r = client.completions.create(model=_name(tiny_llama_dir), prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == _name(tiny_llama_dir)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want_ids)
    assert r.usage.total_tokens == len(ids) + len(want_ids)
    assert r.choices[0].finish_reason == ("length" if len(want_ids) == 12 else "stop")

    chunks = list(client.completions.create(model=_name(tiny_llama_dir), prompt=prompt, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2  # arrived in several pieces
    assert "".join(pieces) == want
    assert chunks[-1].usage.completion_tokens == len(want_ids)
    # a stop string cuts the answer just before it, with finish_reason "stop"
    stop = want[len(want) // 2: len(want) // 2 + 3]
    r = client.completions.create(model=_name(tiny_llama_dir), prompt=prompt, max_tokens=12, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == want[: want.index(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_greedy_equals_generate_with_training_template(client, ref, tiny_llama_dir):
    model, tok = ref
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    ids = encode_chat(messages, tok, "auto")
    assert tok.decode(ids).count("### Instruction:") == 2  # tiny tokenizer has no chat template -> alpaca
    want_ids, want = greedy(model, tok, ids, 10)
    r = client.chat.completions.create(model=_name(tiny_llama_dir), messages=messages, max_tokens=10,
                                       temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want_ids))

    stream = client.chat.completions.create(model=_name(tiny_llama_dir), messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data] == [_name(tiny_llama_dir)]


def test_errors_are_openai_shaped_4xx_and_server_keeps_serving(server, client, ref, tiny_llama_dir):
    model, tok = ref
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = server + "/v1/completions"

    r = httpx.post(url, content=b'{"prompt": "hi", ', headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"prompt": "hi", "temperature": "hot"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(url, json={"prompt": "word " * (MAX_PROMPT + 5)}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": MAX_TOKENS + 1}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(url, json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(url, json={"prompt": "hi"}).status_code == 401  # no key at all
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/health").status_code == 200  # health needs no key

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).completions.create(
            model=_name(tiny_llama_dir), prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=_name(tiny_llama_dir), messages=[])

    # still serving, and still exact
    ids = encode_text(tok, "After the errors")
    _, want = greedy(model, tok, ids, 6)
    r = client.completions.create(model=_name(tiny_llama_dir), prompt="After the errors", max_tokens=6,
                                  temperature=0)
    assert r.choices[0].text == want


def test_32_requests_from_8_clients_each_get_their_own_answer(client, server, ref, tiny_llama_dir):
    model, tok = ref
    words = "apple river stone cloud maple orbit velvet harbor candle meadow piano lantern quartz tiger ember " \
            "willow".split()
    prompts = [f"{words[i % 16]} {words[(i * 7 + 3) % 16]} number {i * 13}" + " and more" * (i % 4)
               for i in range(32)]
    lengths = [4 + i % 5 for i in range(32)]  # different max_tokens share batches too
    want = [greedy(model, tok, encode_text(tok, p), n)[1] for p, n in zip(prompts, lengths)]
    assert len(set(want)) == 32

    def ask(i: int) -> tuple[int, str]:
        if i % 4 == 3:  # a quarter of the clients stream
            s = client.completions.create(model=_name(tiny_llama_dir), prompt=prompts[i], max_tokens=lengths[i],
                                          temperature=0, stream=True)
            return i, "".join(c.choices[0].text for c in s if c.choices)
        r = client.completions.create(model=_name(tiny_llama_dir), prompt=prompts[i], max_tokens=lengths[i],
                                      temperature=0)
        return i, r.choices[0].text

    before = httpx.get(server + "/health").json()
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = dict(pool.map(ask, range(32)))
    assert sorted(got) == list(range(32))
    assert [got[i] for i in range(32)] == want
    health = httpx.get(server + "/health").json()
    assert health["requests"] - before["requests"] == 32
    assert health["max_batch"] >= 2  # the requests were batched, not run one by one
    assert health["in_flight"] == 0


def test_429_when_too_many_requests_in_flight(tiny_llama_dir):
    from coati.inference.engine import BatchingEngine
    from coati.inference.server import ServerConfig, create_app

    model, tok = load_model(tiny_llama_dir)
    gate = threading.Event()

    class Gated(Generator):
        def generate(self, *a, **kw):
            gate.wait(30)
            return super().generate(*a, **kw)

    engine = BatchingEngine(Gated(model, tok), max_batch_size=4, batch_wait_s=0).start()
    app = create_app(engine, ServerConfig(model_name="tiny", max_concurrent=1))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            body = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
            first = asyncio.create_task(c.post("/v1/completions", json=body))
            while engine.stats.batches == 0:  # the first request holds the only slot
                await asyncio.sleep(0.01)
            busy = await c.post("/v1/completions", json=body)
            gate.set()
            done = await first
            after = await c.post("/v1/completions", json=body)
            return busy, done, after

    try:
        busy, done, after = asyncio.run(scenario())
    finally:
        gate.set()
        engine.stop()
    err = busy.json()["error"]
    assert busy.status_code == 429 and (err["type"], err["code"]) == ("rate_limit_error", "too_many_requests")
    assert err["message"].startswith("server busy")
    assert done.status_code == 200 and after.status_code == 200
    assert done.json()["choices"][0]["text"] == after.json()["choices"][0]["text"]


def test_stop_answers_the_requests_still_queued(tiny_llama_dir):
    """The running batch finishes; a request still waiting when the engine stops gets an error instead of
    waiting forever, and the engine holds no request after."""
    from coati.inference.engine import BatchingEngine
    from coati.inference.generation import Completion, SamplingParams

    model, tok = load_model(tiny_llama_dir)
    gate = threading.Event()

    class Gated(Generator):
        def generate(self, *a, **kw):
            gate.wait(30)
            return super().generate(*a, **kw)

    engine = BatchingEngine(Gated(model, tok), max_batch_size=1, batch_wait_s=0).start()
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)

    async def scenario():
        first = asyncio.create_task(engine.complete([1, 5, 6, 7], params))
        while engine.stats.batches == 0:  # the first request is generating (held at the gate)
            await asyncio.sleep(0.01)
        second = asyncio.create_task(engine.complete([1, 5, 6, 8], params))
        while engine.stats.queued == 0:
            await asyncio.sleep(0.01)
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        while not engine._stopped:
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 60)
        stopper.join()
        return results

    try:
        first, second = asyncio.run(scenario())
    finally:
        gate.set()
        engine.stop()
    assert isinstance(first, Completion) and first.completion_tokens == 3
    assert isinstance(second, RuntimeError) and str(second) == "engine is stopped"
    assert engine.stats.active == 0 and engine.stats.queued == 0


def test_stream_frees_its_slot_when_the_client_leaves_before_the_first_chunk(tiny_llama_dir):
    """A client gone before the response starts means the SSE generator never runs: the slot must still be
    freed, or the server ends up refusing everything with 429."""
    from coati.inference.engine import BatchingEngine
    from coati.inference.server import ServerConfig, create_app

    model, tok = load_model(tiny_llama_dir)
    engine = BatchingEngine(Generator(model, tok), max_batch_size=4, batch_wait_s=0).start()
    app = create_app(engine, ServerConfig(model_name="tiny", max_concurrent=1))
    body = json.dumps({"prompt": "hello", "max_tokens": 3, "stream": True}).encode()

    async def leave_early():
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                raise OSError("client went away")

        for _ in range(3):
            with pytest.raises(Exception):
                await app(scope, receive, send)
            messages.append({"type": "http.request", "body": body, "more_body": False})
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            health = (await c.get("/health")).json()
            after = await c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        return health, after

    try:
        health, after = asyncio.run(leave_early())
    finally:
        engine.stop()
    assert health["in_flight"] == 0
    assert after.status_code == 200


def test_batched_left_padded_generation_matches_single(ref, tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    gen = Generator(model, tok)
    prompts = [encode_text(tok, t) for t in ("a", "a much longer prompt than the first one", "mid length")]
    params = [SamplingParams(max_new_tokens=n) for n in (7, 3, 5)]
    pieces: list[str] = []
    outs = gen.generate(prompts, params, on_text=[None, pieces.append, None])
    for p, sp, out in zip(prompts, params, outs):
        want_ids, want = greedy(ref[0], tok, p, sp.max_new_tokens)
        assert out.token_ids == want_ids and out.text == want
    assert "".join(pieces) == outs[1].text and len(outs[1].token_ids) == 3
    with pytest.raises(ValueError):  # greedy and sampled rows cannot share one generate
        gen.generate(prompts[:2], [SamplingParams(), SamplingParams(temperature=0.7)])
    # seeded sampling is reproducible
    s = SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=123)
    assert gen.generate(prompts, s)[0].token_ids == gen.generate(prompts, s)[0].token_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("quant,dtype,max_rel,min_top1,max_rank", [
    (None, "bf16", 0.03, 0.95, 1),
    ("8bit", "auto", 0.03, 0.95, 1),  # int8 round-to-nearest: relative logit error ~0.01 measured
    ("4bit", "auto", 0.20, 0.60, 4),  # NF4 (double quant): ~0.11 measured on this random model
])
def test_reduced_precision_logits_close_to_fp32(ref, tiny_llama_dir, quant, dtype, max_rel, min_top1, max_rank):
    """Tolerances: ||logits_q - logits_fp32|| / ||logits_fp32|| < max_rel over 24 positions; top-1 agreement
    >= min_top1; each of 12 greedy tokens of the reduced model ranks <= max_rank under the fp32 model (the
    random tiny model has nearly flat logits, so 4-bit may swap near-tied neighbours)."""
    if quant:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install coati[quant])")
    full, tok = ref
    try:
        model, _ = load_model(tiny_llama_dir, quant=quant, dtype=dtype, device="cpu")
    except (ImportError, RuntimeError, QuantizationUnavailable) as err:
        pytest.skip(f"{quant} loading cannot run on this machine: {err}")
    if quant == "8bit":
        import bitsandbytes as bnb
        assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    elif quant == "4bit":
        import bitsandbytes as bnb
        assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    else:
        assert model.dtype == torch.bfloat16
    ids = encode_text(tok, "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the "
                           "fire, dreaming of mice and milk and long summer afternoons")[:24]
    assert len(ids) == 24
    want, got = _logits(full, ids), _logits(model, ids)
    rel = ((got - want).norm() / want.norm()).item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert rel < max_rel and top1 >= min_top1, (rel, top1)
    # text: teacher-force the reduced model's greedy answer through the fp32 model
    answer = Generator(model, tok).generate([ids], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    lg = _logits(full, ids + answer.token_ids)[len(ids) - 1: -1]
    ranks = [(lg[i] > lg[i, t]).sum().item() for i, t in enumerate(answer.token_ids)]
    assert len(ranks) == 12 and max(ranks) <= max_rank, ranks


def test_gptq_without_backend_is_a_clear_error(tiny_llama_dir):
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("gptqmodel"):
        pytest.skip("a GPTQ backend is installed here")
    with pytest.raises(QuantizationUnavailable, match="optimum gptqmodel"):
        load_model(tiny_llama_dir, quant="gptq")


def test_lora_adapter_dir_loads_and_matches_peft(ref, tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    full, tok = ref
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tiny_llama_dir)
    ids = encode_text(tok, "Adapters change the answer")
    want = _logits(peft_model, ids)
    assert (want - _logits(full, ids)).abs().max() > 1e-3  # the adapter matters

    merged, tok2 = load_model(tmp_path / "adapter")  # tokenizer comes from the base dir
    assert tok2.eos_token_id == tok.eos_token_id
    assert torch.allclose(_logits(merged, ids), want, atol=1e-4)
    unmerged, _ = load_model(tmp_path / "adapter", merge_adapter=False)
    assert torch.allclose(_logits(unmerged, ids), want, atol=1e-5)


def test_chat_cli_one_prompt_and_multi_turn_session(ref, tiny_llama_dir):
    chat = _load_script("chat")
    model, tok = ref
    common = [str(tiny_llama_dir), "--temperature", "0", "--max_new_tokens", "6", "--prompt_template", "chatml"]

    out = io.StringIO()
    [answer] = chat.main(common + ["--prompt", "Hello?"], out=out)
    want = greedy(model, tok, encode_chat([{"role": "user", "content": "Hello?"}], tok, "chatml"), 6)[1]
    assert answer == want and out.getvalue() == want + "\n"

    lines = iter(["Hi there", "Tell me more", "/reset", "Fresh start", "/exit", "never read"])
    out = io.StringIO()
    answers = chat.main(common + ["--no_stream"], read=lambda _: next(lines), out=out)
    u1, u2, u3 = ({"role": "user", "content": t} for t in ("Hi there", "Tell me more", "Fresh start"))
    a1 = greedy(model, tok, encode_chat([u1], tok, "chatml"), 6)[1]
    a2 = greedy(model, tok, encode_chat([u1, {"role": "assistant", "content": a1}, u2], tok, "chatml"), 6)[1]
    a3 = greedy(model, tok, encode_chat([u3], tok, "chatml"), 6)[1]
    assert answers == [a1, a2, a3]
    assert "(conversation cleared)" in out.getvalue()


def test_benchmark_reports_one_json_line(server, capsys):
    bench = _load_script("benchmark")
    res = bench.main(["--url", server, "--api_key", API_KEY, "--num_requests", "8", "--concurrency", "4",
                      "--max_tokens", "5", "--warmup", "0"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == res
    assert (res["requests"], res["ok"], res["errors"]) == (8, 8, 0)
    assert res["completion_tokens"] == 8 * 5  # ignore_eos: every answer is exactly max_tokens long
    assert 0 < res["ttft_p50_s"] <= res["latency_p50_s"] <= res["latency_p95_s"]
    assert res["requests_per_s"] == pytest.approx(8 / res["wall_s"], rel=1e-2)
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_4bit_on_cpu_keeps_layers_the_cpu_kernel_cannot_run(tmp_path):
    """bitsandbytes' packed CPU NF4 kernel needs in_features % 64 == 0; a 96-wide MLP keeps down_proj fp32."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install coati[quant])")
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x quantizes with bitsandbytes on GPU only")
    from tests import tiny

    path = tiny.save_tiny_model("llama", tmp_path / "odd", intermediate_size=96)
    full, tok = load_model(path)
    model, _ = load_model(path, quant="4bit", device="cpu")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.up_proj, bnb.nn.Linear4bit) and type(mlp.down_proj) is torch.nn.Linear
    ids = encode_text(tok, "odd sizes still run")
    want, got = _logits(full, ids), _logits(model, ids)
    assert ((got - want).norm() / want.norm()).item() < 0.2


def test_request_settings_win_over_the_saved_generation_config(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    model.generation_config.top_k = 1  # would turn every sampled request into greedy if it leaked in
    gen = Generator(model, tok)
    ids = [encode_text(tok, "hello world")]
    firsts = {gen.generate(ids, SamplingParams(max_new_tokens=1, temperature=1.0, seed=s))[0].token_ids[0]
              for s in range(12)}
    assert len(firsts) >= 6  # near-flat random logits over 32000 tokens: no top-k, so seeds differ
    def favour_eos(module, inputs, logits):  # make EOS the clear favourite at every step
        logits[..., tok.eos_token_id] += 100.0
        return logits

    model.lm_head.register_forward_hook(favour_eos)
    plain = gen.generate(ids, SamplingParams(max_new_tokens=5))[0]
    assert (plain.token_ids, plain.finish_reason, plain.text) == ([], "stop", "")
    forced = gen.generate(ids, SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert len(forced.token_ids) == 5 and tok.eos_token_id not in forced.token_ids
    assert forced.finish_reason == "length"
