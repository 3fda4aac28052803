"""tests/tiny.py itself: the in-process tokenizers keep the layout other tests rely on, and the published-like
checkpoint has the properties of a downloaded chat model when plain transformers reloads it."""
import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests import tiny

AUTO_DTYPE = {"dtype": "auto"} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": "auto"}


def test_llama_stand_in_matches_llama2_where_tests_rely_on_it(llama2_tokenizer):
    """Special ids, byte pieces (dist_ppo's 3..63 = 0x00..0x3C), split digits and the newline rule agree with
    the real LLaMA-2 tokenizer; only the learned pieces differ."""
    ours, real = tiny.tokenizer("llama"), llama2_tokenizer
    for tok in (ours, real):
        assert (len(tok), tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (32000, 0, 1, 2, 0)
        assert tok.convert_ids_to_tokens(list(range(3, 259))) == [f"<0x{b:02X}>" for b in range(256)]
        assert tok.decode([58]) == "7" and tok.decode(list(range(36, 46))) == "!\"#$%&'()*"
        ids = tok("\n12 apples", add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids)[:4] == ["▁", "<0x0A>", "1", "2"]
        text = "Hello  world\tand 한국어"
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert ours.convert_ids_to_tokens(ours("the capital", add_special_tokens=False).input_ids) == ["▁the", "▁capital"]


def test_gpt2_stand_in_layout():
    tok = tiny.tokenizer("gpt2")
    assert len(tok) == 50257 and tok.eos_token == tok.bos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 50256 and tok("Hi<|endoftext|>").input_ids[-1] == 50256
    text = "Hello  world\n\tand 한국어"
    assert tok.decode(tok(text).input_ids, clean_up_tokenization_spaces=False) == text  # byte-level: every string round-trips


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_published_like_checkpoint_reloads_with_those_properties(family, tmp_path):
    path = tiny.save_published_like_model(family, tmp_path / family)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **AUTO_DTYPE)
    tok = AutoTokenizer.from_pretrained(path)

    # bf16 in the config and in every stored tensor
    assert str(getattr(config, "dtype", None) or config.torch_dtype).removeprefix("torch.") == "bfloat16"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(stored.values()) == {"BF16"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # tied embeddings: one tensor, stored once
    assert config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not any(k.startswith("lm_head") for k in stored)
    # pad token == EOS, in the tokenizer and the config
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id == config.eos_token_id
    assert config.pad_token_id == config.eos_token_id
    # a chat template that closes turns with EOS
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    eos = tok.eos_token
    assert tok.apply_chat_template(messages, tokenize=False) == f"<|user|>\nHi{eos}\n<|assistant|>\nHello{eos}\n"
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>\n")

    ids = torch.tensor([tok("a published checkpoint").input_ids])
    if family == "llama":  # grouped-query attention: fewer key/value heads than query heads
        attn = model.model.layers[0].self_attn
        assert config.num_key_value_heads < config.num_attention_heads
        assert attn.k_proj.out_features == config.num_key_value_heads * attn.head_dim < attn.q_proj.out_features
    else:  # GPT-2's dropout 0.1 everywhere: train mode is noisy, eval mode is not
        assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.1, 0.1, 0.1)
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_default_fixtures_stay_fp32_untied_and_dropout_free(tmp_path):
    """Other tests rely on these: fp32 (bf16 is ~20x slower on CPU) and deterministic forwards."""
    for family in ("llama", "gpt2"):
        path = tiny.save_tiny_model(family, tmp_path / family)
        model = AutoModelForCausalLM.from_pretrained(path, **AUTO_DTYPE).train()
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, model(ids).logits)
    assert not tiny.llama_config().tie_word_embeddings
