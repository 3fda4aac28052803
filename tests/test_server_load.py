"""The server under a mixed concurrent load, over real loopback TCP (in-process uvicorn), so client
disconnects are real: well-formed requests (half streaming, chat and completions) must get exactly the
greedy answer of plain `model.generate`, malformed ones a 400 in OpenAI's shape, and a client that leaves
must stop its generation; afterwards the engine must hold no request state."""
from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from coati.inference.engine import BatchingEngine, _Request
from coati.inference.generation import Generator, encode_chat, encode_text
from coati.inference.loading import load_model
from tests.test_inference import greedy

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

LONG = 256  # max_tokens of the requests whose clients leave: a run to the end would take this many steps


@pytest.fixture(scope="module")
def ref(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    """(url, engine) of the app served by uvicorn in a thread on a free loopback port."""
    from coati.inference.server import ServerConfig, create_app

    model, tok = load_model(tiny_llama_dir)
    engine = BatchingEngine(Generator(model, tok), max_batch_size=8, batch_wait_s=0.02)
    app = create_app(engine, ServerConfig(model_name="tiny", max_prompt_tokens=128, max_tokens_limit=LONG))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=30)


async def _settled(url: str, timeout: float = 20.0) -> dict:
    """/health once nothing is in flight or active any more (fails the test if that never happens)."""
    deadline = time.time() + timeout
    async with httpx.AsyncClient(base_url=url) as c:
        while True:
            health = (await c.get("/health")).json()
            if health["in_flight"] == health["active"] == health["queued"] == 0:
                return health
            assert time.time() < deadline, f"requests still held: {health}"
            await asyncio.sleep(0.05)


def _leftover_requests() -> int:
    gc.collect()
    return sum(type(o) is _Request for o in gc.get_objects())


def test_mixed_load_answers_rejects_and_stops_work_for_clients_that_left(live, ref):
    url, engine = live
    model, tok = ref
    ai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    words = "apple river stone cloud maple orbit velvet harbor candle meadow piano lantern".split()
    # 16 well-formed: i % 2 picks chat or completions, i % 4 >= 2 streams; each its own prompt and length
    good = [(i % 2 == 1, i % 4 >= 2, f"{words[i % 12]} {words[(i * 5 + 1) % 12]} item {i * 17}", 4 + i % 5)
            for i in range(16)]

    def prompt_ids(chat: bool, text: str) -> list[int]:
        return encode_chat([{"role": "user", "content": text}], tok) if chat else encode_text(tok, text)

    refs = [greedy(model, tok, prompt_ids(chat, text), n) for chat, _, text, n in good]
    want = [text for _, text in refs]
    assert len(set(want)) == 16

    async def ask(chat: bool, stream: bool, text: str, n: int, leave: bool = False) -> str:
        kw = dict(model="tiny", max_tokens=n, temperature=0)
        if leave:
            kw["extra_body"] = {"ignore_eos": True}  # would run all `n` steps if nothing stopped it
        if chat:
            call = ai.chat.completions.create(messages=[{"role": "user", "content": text}], stream=stream, **kw)
        else:
            call = ai.completions.create(prompt=text, stream=stream, **kw)
        res = await call
        if not stream:
            return res.choices[0].message.content if chat else res.choices[0].text
        pieces = []
        async for chunk in res:
            piece = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) if chunk.choices else ""
            pieces.append(piece or "")
            if leave and piece:  # generation has started: leave after the first text
                await res.close()
                break
        return "".join(pieces)

    bad = [(b'{"prompt": "hi", ', "/v1/completions"),
           (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "/v1/completions"),
           (json.dumps({"messages": []}).encode(), "/v1/chat/completions"),
           (json.dumps({"prompt": "hi", "max_tokens": LONG + 1}).encode(), "/v1/completions")]

    async def malformed(raw: bytes, path: str):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await c.post(path, content=raw, headers={"Content-Type": "application/json"})

    async def load():
        before = await _settled(url)
        jobs = [ask(*g) for g in good]
        jobs += [ask(i % 2 == 1, True, f"leaving client {i}", LONG, leave=True) for i in range(4)]
        jobs += [malformed(raw, path) for raw, path in bad]
        return before, await asyncio.gather(*jobs), await _settled(url)

    before, results, after = asyncio.run(load())
    assert results[:16] == want  # every well-formed request, streamed or not, got its exact answer
    for r in results[20:]:
        assert r.status_code == 400
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    left_with = results[16:20]
    assert all(left_with)  # each leaver saw text before it left
    # the engine ran all 20 requests; the 4 whose clients left were cancelled well before LONG tokens each
    assert after["requests"] - before["requests"] == 20
    assert after["cancelled"] - before["cancelled"] == 4
    leavers_tokens = after["completion_tokens"] - before["completion_tokens"] - sum(len(i) for i, _ in refs)
    assert 4 <= leavers_tokens < 4 * LONG // 4, leavers_tokens
    assert engine.stats.active == 0 and _leftover_requests() == 0  # no per-request state kept


def test_non_streaming_client_that_leaves_stops_its_generation(live):
    """FastAPI does not cancel a plain (non-streaming) handler when its client disconnects, so without the
    server watching for the disconnect the answer would be generated to its last token for nobody."""
    url, engine = live

    async def leave_mid_generation():
        before = await _settled(url)
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            call = asyncio.create_task(c.post("/v1/completions", json={
                "prompt": "nobody reads this", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}))
            deadline = time.time() + 20
            while engine.stats.batches == before["batches"]:  # wait until its generation runs
                assert time.time() < deadline
                await asyncio.sleep(0.005)
            call.cancel()  # the client gives up: httpx closes the connection
            with pytest.raises(asyncio.CancelledError):
                await call
        return before, await _settled(url)

    before, after = asyncio.run(leave_mid_generation())
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["completion_tokens"] - before["completion_tokens"] < LONG // 2
    assert _leftover_requests() == 0


def test_benchmark_mixed_load_counts_answers_rejections_and_stopped_streams(live, capsys):
    from tests.scripts import load_script

    url, _ = live
    bench = load_script("inference/benchmark.py")
    n = 64  # each leaver would cost this many tokens if its generation ran on
    res = bench.main(["--url", url, "--mixed", "--num_requests", "16", "--concurrency", "8", "--max_tokens",
                      str(n), "--warmup", "0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res
    assert (res["requests"], res["ok"], res["errors"]) == (16, 12, 0)
    assert (res["rejected_400"], res["left_mid_stream"], res["server_cancelled"]) == (2, 2, 2)
    assert res["completion_tokens"] == 12 * n  # ignore_eos: every answer is exactly max_tokens long
    assert 2 <= res["tokens_for_clients_that_left"] < n  # both leavers together: less than one whole answer
    assert res["server_active_after"] == res["server_in_flight_after"] == 0
    assert res["latency_p50_s"] <= res["latency_p95_s"] <= res["latency_p99_s"]
    assert "rss_idle_mb" not in res  # a remote server's memory is not this process's
