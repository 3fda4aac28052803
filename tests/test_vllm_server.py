"""``inference/server.py --engine vllm``: the HF engine's server tests (tests/test_inference.py: chat, streaming,
completions, stop strings, bad JSON, bad key, unknown model, oversize prompt, 32 concurrent clients) against a
vLLM server, every answer compared token for token with plain HF ``generate``; then what only vLLM's engine
does (a request joins a running batch, a saved generation_config.json never applies).

Needs vLLM (``pip install 'coati[vllm]'``; CI runs it in the vLLM venv, see ``.ci/run``) and skips without it.
"""
import importlib.util
import os
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


if HAS_VLLM:
    # in-process vLLM on CPU, a small KV cache (GiB) on a shared machine
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
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
