"""``inference/server.py --engine vllm``: the HF engine's server tests (tests/test_inference.py: chat, streaming,
completions, stop strings, bad JSON, bad key, unknown model, oversize prompt, 32 concurrent clients) against a
vLLM server, every answer compared token for token with plain HF ``generate``; then what only vLLM's engine
does (a request joins and leaves a running batch, a cancel stops its request, a saved generation_config.json
never applies).

Needs vLLM (``pip install 'coati[vllm]'``; CI runs it in the vLLM venv, see ``.ci/run``) and skips without it.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

from coati.errors import UsageError

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'coati[vllm]')")


def test_without_vllm_engine_vllm_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from tests.scripts import load_script

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    pytest.importorskip("uvicorn")
    with pytest.raises(UsageError, match=r"^--engine vllm needs vLLM: pip install 'coati\[vllm\]'$"):
        load_script("inference/server.py").main([str(tmp_path), "--engine", "vllm"])


@needs_vllm
@pytest.mark.parametrize("flags, message", [
    (["--quant", "8bit"], "drop --quant"),
    (["--device", "cpu"], "drop --device"),
])
def test_engine_vllm_refuses_what_it_cannot_serve(flags, message, tiny_llama_dir):
    from tests.scripts import load_script

    with pytest.raises(UsageError, match=message):
        load_script("inference/server.py").main([str(tiny_llama_dir), "--engine", "vllm", *flags])


@needs_vllm
def test_engine_vllm_refuses_an_adapter_dir_and_a_missing_dir(tmp_path):
    from coati.errors import MissingInputError
    from tests.scripts import load_script

    main = load_script("inference/server.py").main
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UsageError, match="is a LoRA adapter: merge it"):
        main([str(tmp_path), "--engine", "vllm"])
    with pytest.raises(MissingInputError, match="no such model directory"):
        main([str(tmp_path / "absent"), "--engine", "vllm"])


if HAS_VLLM:
    # the HF engine's server tests, run here against --engine vllm (fixtures overridden below)
    from tests.test_inference import (  # noqa: F401
        client,
        ref,
        server,
        test_32_requests_from_8_clients_each_get_their_own_answer,
        test_chat_greedy_equals_generate_with_training_template,
        test_completions_greedy_equals_generate_plain_and_streamed,
        test_errors_are_openai_shaped_4xx_and_server_keeps_serving,
    )
from tests import tiny  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    """vLLM in-process on CPU, with a small KV cache (GiB) on a shared machine, for this module's servers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        yield


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """The suite's tiny LLaMA with head size 32 (vLLM's CPU attention has no 16), its generation_config.json
    saying top_k 1: that would make every sampled request greedy if it applied (greedy answers are unchanged,
    so the HF reference stays plain greedy)."""
    from transformers import GenerationConfig

    path = tiny.save_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama_vllm"), num_attention_heads=2,
                                num_key_value_heads=1)
    config = GenerationConfig.from_pretrained(path)
    config.do_sample, config.top_k = True, 1
    config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine_args() -> list[str]:
    return ["--engine", "vllm"]


@needs_vllm
def test_requests_are_stepped_token_by_token(server, client, tiny_llama_dir):
    """vLLM's continuous batching: one engine step per token, requests joining and leaving between steps (the HF
    engine runs whole batches: never more batches than requests)."""
    import httpx

    client.completions.create(model=Path(tiny_llama_dir).name, prompt="one two three", max_tokens=8,
                              temperature=0, extra_body={"ignore_eos": True})
    health = httpx.get(server + "/health").json()
    assert health["batches"] >= health["requests"] + 7
    assert health["active"] == 0 and health["queued"] == 0 and health["in_flight"] == 0


@needs_vllm
def test_saved_generation_config_never_applies(client, tiny_llama_dir):
    texts = {client.completions.create(model=Path(tiny_llama_dir).name, prompt="hello world", max_tokens=2,
                                       temperature=1.0, seed=seed).choices[0].text for seed in range(12)}
    assert len(texts) >= 6  # near-flat random logits over 32000 tokens: no top-k 1, so seeds differ


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    """A second engine, in this process, to drive requests' timing directly. This process's main thread runs one
    OpenMP thread (tests/conftest.py) and a fresh thread the machine's count: as in a server whose main thread
    set its own count, vLLM's CPU kernels ran only if the engine's thread built the engine too."""
    from coati.inference.loading import load_tokenizer
    from coati.inference.vllm_engine import VLLMServingEngine

    engine = VLLMServingEngine(tiny_llama_dir, load_tokenizer(tiny_llama_dir), dtype="float32", max_num_seqs=4,
                               enforce_eager=True, kv_cache_memory_bytes=2**27).start()
    yield engine
    engine.stop()


@needs_vllm
def test_a_short_request_joins_and_leaves_a_running_long_one_which_a_cancel_stops(engine, ref):
    import asyncio
    import time

    import torch

    from coati.inference.generation import SamplingParams, encode_text

    model, tok = ref
    long_ids, short_ids = encode_text(tok, "a long story begins"), encode_text(tok, "short")
    with torch.no_grad():
        want = model.generate(torch.tensor([short_ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(short_ids):].tolist()
    stats = engine.stats

    async def scenario():
        before = (stats.batches, stats.cancelled, stats.completion_tokens)
        long = asyncio.create_task(engine.complete(long_ids, SamplingParams(max_new_tokens=400, ignore_eos=True)))
        deadline = time.monotonic() + 60
        while stats.batches < before[0] + 3:  # the long request is generating
            if long.done():
                raise AssertionError(f"the long request ended early: {long.result()!r}")
            assert time.monotonic() < deadline, f"no engine steps: {stats}"
            await asyncio.sleep(0.002)
        short = await asyncio.wait_for(engine.complete(short_ids, SamplingParams(max_new_tokens=4, ignore_eos=True)), 60)
        running = not long.done()
        long.cancel()
        while stats.active:
            assert time.monotonic() < deadline, f"requests still active: {stats}"
            await asyncio.sleep(0.01)
        return short, running, before

    short, running, (_, cancelled, tokens) = asyncio.run(scenario())
    assert running  # the short request did not wait for the long one
    assert short.token_ids == want and short.finish_reason == "length"
    assert stats.cancelled == cancelled + 1 and stats.active == 0
    assert stats.completion_tokens - tokens < 400  # the long one stopped early
    assert engine.engine.get_num_unfinished_requests() == 0  # and vLLM dropped it (aborted, not left running)


@needs_vllm
def test_an_error_in_a_worker_turn_fails_only_its_request_and_the_worker_lives_on(engine, monkeypatch):
    """An error in the worker's turn outside vLLM's step (here the row tracker's, on one request's first token)
    fails that request only: the one beside it finishes, and so does the next (a worker that died would leave
    every caller waiting forever)."""
    import asyncio

    from coati.inference.generation import SamplingParams

    calls, add = [], engine.tracker.add

    def add_failing_once(row, token):
        calls.append(token)
        if len(calls) == 1:
            raise RuntimeError("the tracker broke")
        return add(row, token)

    monkeypatch.setattr(engine.tracker, "add", add_failing_once)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)

    async def ask(n: int):
        return await asyncio.wait_for(asyncio.gather(*(engine.complete([1, 5, 6, 7 + i], params) for i in range(n)),
                                                     return_exceptions=True), 60)

    results = asyncio.run(ask(2))
    assert sorted(type(r).__name__ for r in results) == ["Completion", "RuntimeError"], results
    assert [r.completion_tokens for r in results if not isinstance(r, Exception)] == [3]
    assert [str(r) for r in results if isinstance(r, Exception)] == ["the tracker broke"]
    assert asyncio.run(ask(1))[0].completion_tokens == 3  # the worker lives on
    assert engine.stats.active == 0 and engine.engine.get_num_unfinished_requests() == 0
