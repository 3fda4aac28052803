"""inference/chat.py with Colossal-LLaMA's inference_example.py flags."""
from __future__ import annotations

import io

import pytest

from tests.scripts import load_script


def test_colossal_flags_match_the_positional_form(tiny_llama_dir):
    chat = load_script("inference/chat.py")
    common = ["--max_new_tokens", "6", "--prompt_template", "alpaca"]
    greedy = chat.main([str(tiny_llama_dir), "--temperature", "0", "--prompt", "Hello?", *common], out=io.StringIO())
    colossal = chat.main(["--model_path", str(tiny_llama_dir), "--device", "cpu", "--input_txt", "Hello?",
                          "--do_sample", "false", "--temperature", "0.9", "--top_k", "50", "--top_p", "0.95",
                          *common], out=io.StringIO())
    assert colossal == greedy  # --do_sample false decodes greedily whatever the temperature
    sampled = chat.main(["--model_path", str(tiny_llama_dir), "--input_txt", "Hello?", "--do_sample",
                         "--temperature", "5", "--top_k", "0", "--top_p", "1", "--seed", "3", *common],
                        out=io.StringIO())
    assert sampled != greedy
    with pytest.raises(SystemExit):
        chat.main(["--input_txt", "Hello?"], out=io.StringIO())
